"""SiLU(gate) * up fused with FP8 quantization: torch references and fake impls.

Ops (``torch.ops.vllm_fusion.*``, kernels in csrc/act_quant_kernels.cu); ``input`` is
``[..., 2d]`` = ``[gate | up]``, the outputs are ``[..., d]``::

    silu_and_mul_static_fp8_quant(input, scale) -> q
    silu_and_mul_dynamic_fp8_quant(input, group_size, scale_transposed, scale_ue8m0, scale_ub)
        -> (q, scales)
    silu_and_mul_nvfp4_quant(input, global_scale) -> (q, block_scales)   (SM100+; q is
        [rows, d / 2] and the block scales are swizzled, see :mod:`vllm_fusion.ops.nvfp4`)

The reference is vLLM 0.26's unfused path: ``F.silu(x[..., :d]) * x[..., d:]`` in the input
dtype (silu computed in fp32 and rounded, then the product rounded), then the quantization
references of :mod:`vllm_fusion.ops.fp8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_fusion.ops.checks import check_act_input, check_nvfp4_width, check_scale_scalar
from vllm_fusion.ops.fp8 import (
    check_dynamic_args,
    dynamic_fp8_quant_ref,
    empty_scales,
    fp8_dtype,
    static_fp8_quant_ref,
)
from vllm_fusion.ops.nvfp4 import empty_outputs, nvfp4_quant_ref

OPS = (
    "silu_and_mul_static_fp8_quant",
    "silu_and_mul_dynamic_fp8_quant",
    "silu_and_mul_nvfp4_quant",
)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul_static_fp8_quant_ref(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return static_fp8_quant_ref(silu_and_mul_ref(input), scale)


def silu_and_mul_dynamic_fp8_quant_ref(
    input: torch.Tensor,
    group_size: int,
    scale_transposed: bool,
    scale_ue8m0: bool,
    scale_ub: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = silu_and_mul_ref(input)
    return dynamic_fp8_quant_ref(y, group_size, scale_transposed, scale_ue8m0, scale_ub)


def silu_and_mul_nvfp4_quant_ref(
    input: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return nvfp4_quant_ref(silu_and_mul_ref(input), global_scale)


def _out_shape(input: torch.Tensor) -> tuple[int, ...]:
    return (*input.shape[:-1], input.shape[-1] // 2)


def register_fakes() -> None:
    """Called once by vllm_fusion.ops after the library defined the ops.

    Each fake runs the kernel's input checks first (vllm_fusion.ops.checks)."""

    @torch.library.register_fake("vllm_fusion::silu_and_mul_static_fp8_quant")
    def _silu_and_mul_static_fp8_quant_fake(input, scale):
        op = "silu_and_mul_static_fp8_quant"
        check_act_input(op, input)
        check_scale_scalar(op, "scale", scale, input)
        return input.new_empty(_out_shape(input), dtype=fp8_dtype(input.device))

    @torch.library.register_fake("vllm_fusion::silu_and_mul_dynamic_fp8_quant")
    def _silu_and_mul_dynamic_fp8_quant_fake(
        input, group_size, scale_transposed, scale_ue8m0, scale_ub
    ):
        op = "silu_and_mul_dynamic_fp8_quant"
        check_act_input(op, input)
        if scale_ub is not None:
            check_scale_scalar(op, "scale_ub", scale_ub, input)
        shape = _out_shape(input)
        check_dynamic_args(shape[-1], group_size, scale_transposed, scale_ue8m0, input.dim())
        q = input.new_empty(shape, dtype=fp8_dtype(input.device))
        ngroups = shape[-1] // group_size if group_size else 1
        return q, empty_scales(input, shape, ngroups, scale_transposed)

    @torch.library.register_fake("vllm_fusion::silu_and_mul_nvfp4_quant")
    def _silu_and_mul_nvfp4_quant_fake(input, global_scale):
        op = "silu_and_mul_nvfp4_quant"
        check_act_input(op, input)
        d = _out_shape(input)[-1]
        check_nvfp4_width(op, d, "output width (half the last dim of input)")
        check_scale_scalar(op, "global_scale", global_scale, input)
        return empty_outputs(input, input.numel() // input.shape[-1], d)
