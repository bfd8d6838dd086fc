"""RMSNorm (+ residual add) fused with FP8 quantization: torch references and fake impls.

Ops (``torch.ops.vllm_fusion.*``, kernels in csrc/norm_quant_kernels.cu)::

    rms_norm_static_fp8_quant(input, weight, scale, epsilon) -> q
    fused_add_rms_norm_static_fp8_quant(input, residual, weight, scale, epsilon)
        -> (q, residual_out)
    rms_norm_dynamic_fp8_quant(input, weight, epsilon, group_size, scale_transposed,
                               scale_ue8m0, scale_ub) -> (q, scales)
    fused_add_rms_norm_dynamic_fp8_quant(input, residual, weight, epsilon, group_size,
                                         scale_transposed, scale_ue8m0, scale_ub)
        -> (q, residual_out, scales)
    rms_norm_nvfp4_quant(input, weight, global_scale, epsilon) -> (q, block_scales)
    fused_add_rms_norm_nvfp4_quant(input, residual, weight, global_scale, epsilon)
        -> (q, residual_out, block_scales)

The NVFP4 ops (SM100+) produce what ``scaled_fp4_quant`` of the normalized rows does (see
:mod:`vllm_fusion.ops.nvfp4`): ``q`` is ``[rows, H / 2]`` whatever the input's rank.

The references compose vLLM 0.26's native ``vllm_ir.rms_norm`` / ``fused_add_rms_norm``
(fp32 math, the normalized value rounded to the input dtype, then a multiply by the weight in
the input dtype) with the quantization references of :mod:`vllm_fusion.ops.fp8`. In the
fused-add variants the norm is taken of the fp32 sum, and ``residual_out`` is that sum rounded
to the input dtype, as the native impl does.
"""

from __future__ import annotations

import torch

from vllm_fusion.ops.checks import (
    check_activation,
    check_norm_args,
    check_nvfp4_width,
    check_scale_scalar,
)
from vllm_fusion.ops.fp8 import (
    check_dynamic_args,
    dynamic_fp8_quant_ref,
    empty_scales,
    fp8_dtype,
    static_fp8_quant_ref,
)
from vllm_fusion.ops.nvfp4 import empty_outputs, nvfp4_quant_ref

OPS = (
    "rms_norm_static_fp8_quant",
    "fused_add_rms_norm_static_fp8_quant",
    "rms_norm_dynamic_fp8_quant",
    "fused_add_rms_norm_dynamic_fp8_quant",
    "rms_norm_nvfp4_quant",
    "fused_add_rms_norm_nvfp4_quant",
)


# ----------------------------------------------------------------------------- references


def _normalize(x32: torch.Tensor, weight: torch.Tensor, epsilon: float, dtype: torch.dtype):
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + epsilon)
    return (x32.to(weight.dtype) * weight).to(dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """vLLM 0.26 ``vllm_ir.rms_norm`` native impl."""
    return _normalize(x.to(torch.float32), weight, epsilon, x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.26 ``vllm_ir.fused_add_rms_norm`` native impl: (normed, residual_out)."""
    x32 = x.to(torch.float32) + residual.to(torch.float32)
    return _normalize(x32, weight, epsilon, x.dtype), x32.to(x.dtype)


def rms_norm_static_fp8_quant_ref(
    input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float
) -> torch.Tensor:
    return static_fp8_quant_ref(rms_norm_ref(input, weight, epsilon), scale)


def fused_add_rms_norm_static_fp8_quant_ref(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, residual_out = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    return static_fp8_quant_ref(y, scale), residual_out


def rms_norm_dynamic_fp8_quant_ref(
    input: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    group_size: int,
    scale_transposed: bool,
    scale_ue8m0: bool,
    scale_ub: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = rms_norm_ref(input, weight, epsilon)
    return dynamic_fp8_quant_ref(y, group_size, scale_transposed, scale_ue8m0, scale_ub)


def fused_add_rms_norm_dynamic_fp8_quant_ref(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    group_size: int,
    scale_transposed: bool,
    scale_ue8m0: bool,
    scale_ub: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, residual_out = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    q, scales = dynamic_fp8_quant_ref(y, group_size, scale_transposed, scale_ue8m0, scale_ub)
    return q, residual_out, scales


def rms_norm_nvfp4_quant_ref(
    input: torch.Tensor, weight: torch.Tensor, global_scale: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return nvfp4_quant_ref(rms_norm_ref(input, weight, epsilon), global_scale)


def fused_add_rms_norm_nvfp4_quant_ref(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    global_scale: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, residual_out = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    q, scales = nvfp4_quant_ref(y, global_scale)
    return q, residual_out, scales


# ----------------------------------------------------------------------------- fake impls


def _fake_nvfp4(op, input, residual, weight, global_scale):
    # The kernel's order: input, block width, then the norm's operands and the scale.
    check_activation(op, "input", input)
    hidden = input.shape[-1]
    check_nvfp4_width(op, hidden, "hidden size (last dim of input)")
    check_norm_args(op, input, residual, weight)
    check_scale_scalar(op, "global_scale", global_scale, input)
    return empty_outputs(input, input.numel() // hidden, hidden)


def _fake_dynamic(input, group_size, scale_transposed, scale_ue8m0):
    hidden = input.shape[-1]
    check_dynamic_args(hidden, group_size, scale_transposed, scale_ue8m0, input.dim())
    q = input.new_empty(input.shape, dtype=fp8_dtype(input.device))
    ngroups = hidden // group_size if group_size else 1
    return q, empty_scales(input, tuple(input.shape), ngroups, scale_transposed)


def register_fakes() -> None:
    """Called once by vllm_fusion.ops after the library defined the ops.

    Each fake runs the kernel's input checks first (vllm_fusion.ops.checks)."""

    @torch.library.register_fake("vllm_fusion::rms_norm_static_fp8_quant")
    def _rms_norm_static_fp8_quant_fake(input, weight, scale, epsilon):
        op = "rms_norm_static_fp8_quant"
        check_norm_args(op, input, None, weight)
        check_scale_scalar(op, "scale", scale, input)
        return input.new_empty(input.shape, dtype=fp8_dtype(input.device))

    @torch.library.register_fake("vllm_fusion::fused_add_rms_norm_static_fp8_quant")
    def _fused_add_rms_norm_static_fp8_quant_fake(input, residual, weight, scale, epsilon):
        op = "fused_add_rms_norm_static_fp8_quant"
        check_norm_args(op, input, residual, weight)
        check_scale_scalar(op, "scale", scale, input)
        q = input.new_empty(input.shape, dtype=fp8_dtype(input.device))
        return q, input.new_empty(input.shape)

    @torch.library.register_fake("vllm_fusion::rms_norm_dynamic_fp8_quant")
    def _rms_norm_dynamic_fp8_quant_fake(
        input, weight, epsilon, group_size, scale_transposed, scale_ue8m0, scale_ub
    ):
        op = "rms_norm_dynamic_fp8_quant"
        check_norm_args(op, input, None, weight)
        if scale_ub is not None:
            check_scale_scalar(op, "scale_ub", scale_ub, input)
        return _fake_dynamic(input, group_size, scale_transposed, scale_ue8m0)

    @torch.library.register_fake("vllm_fusion::fused_add_rms_norm_dynamic_fp8_quant")
    def _fused_add_rms_norm_dynamic_fp8_quant_fake(
        input, residual, weight, epsilon, group_size, scale_transposed, scale_ue8m0, scale_ub
    ):
        op = "fused_add_rms_norm_dynamic_fp8_quant"
        check_norm_args(op, input, residual, weight)
        if scale_ub is not None:
            check_scale_scalar(op, "scale_ub", scale_ub, input)
        q, scales = _fake_dynamic(input, group_size, scale_transposed, scale_ue8m0)
        return q, input.new_empty(input.shape), scales

    @torch.library.register_fake("vllm_fusion::rms_norm_nvfp4_quant")
    def _rms_norm_nvfp4_quant_fake(input, weight, global_scale, epsilon):
        return _fake_nvfp4("rms_norm_nvfp4_quant", input, None, weight, global_scale)

    @torch.library.register_fake("vllm_fusion::fused_add_rms_norm_nvfp4_quant")
    def _fused_add_rms_norm_nvfp4_quant_fake(input, residual, weight, global_scale, epsilon):
        q, scales = _fake_nvfp4("fused_add_rms_norm_nvfp4_quant", input, residual, weight,
                                global_scale)
        return q, input.new_empty(input.shape), scales
