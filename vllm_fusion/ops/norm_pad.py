"""RMSNorm (+ residual add) written into a zero-padded hidden dimension: torch references and
fake impls.

Ops (``torch.ops.vllm_fusion.*``, kernels in csrc/norm_pad_kernels.cu)::

    rms_norm_pad(input, weight, epsilon, padded_hidden) -> out
    fused_add_rms_norm_pad(input, residual, weight, epsilon, padded_hidden)
        -> (out, residual_out)

``out`` has shape ``[..., padded_hidden]`` (contiguous): the normalized input in the first
``H = input.shape[-1]`` columns, zeros after them. It is what vLLM 0.26 computes as
``F.pad(vllm_ir.(fused_add_)rms_norm(...), (0, padded_hidden - H))`` before a MoE layer whose
GEMMs want the hidden size padded (gpt-oss: 2880 -> 3072). ``residual_out`` is as in
``fused_add_rms_norm``: the fp32 sum rounded to the input dtype, shape of ``input``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_fusion.ops.checks import check_norm_args, check_padded_hidden
from vllm_fusion.ops.norm_quant import fused_add_rms_norm_ref, rms_norm_ref

OPS = ("rms_norm_pad", "fused_add_rms_norm_pad")


# ----------------------------------------------------------------------------- references


def _pad(y: torch.Tensor, padded_hidden: int) -> torch.Tensor:
    check_padded_hidden("rms_norm_pad", y, padded_hidden)
    return F.pad(y, (0, padded_hidden - y.shape[-1]), mode="constant", value=0.0)


def rms_norm_pad_ref(
    input: torch.Tensor, weight: torch.Tensor, epsilon: float, padded_hidden: int
) -> torch.Tensor:
    """vLLM 0.26's ``vllm_ir.rms_norm`` native impl, then ``F.pad`` to ``padded_hidden``."""
    return _pad(rms_norm_ref(input, weight, epsilon), padded_hidden)


def fused_add_rms_norm_pad_ref(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    padded_hidden: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.26's ``vllm_ir.fused_add_rms_norm`` native impl, then ``F.pad`` of the normalized
    output: (out, residual_out)."""
    y, residual_out = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    return _pad(y, padded_hidden), residual_out


# ----------------------------------------------------------------------------- fake impls


def _checked_padded_empty(op: str, input: torch.Tensor, residual: torch.Tensor | None,
                          weight: torch.Tensor, padded_hidden: int) -> torch.Tensor:
    """The kernel's input checks (vllm_fusion.ops.checks), then the padded output."""
    check_norm_args(op, input, residual, weight)
    check_padded_hidden(op, input, padded_hidden)
    return input.new_empty((*input.shape[:-1], padded_hidden))


def register_fakes() -> None:
    """Called once by vllm_fusion.ops after the library defined the ops."""

    @torch.library.register_fake("vllm_fusion::rms_norm_pad")
    def _rms_norm_pad_fake(input, weight, epsilon, padded_hidden):
        return _checked_padded_empty("rms_norm_pad", input, None, weight, padded_hidden)

    @torch.library.register_fake("vllm_fusion::fused_add_rms_norm_pad")
    def _fused_add_rms_norm_pad_fake(input, residual, weight, epsilon, padded_hidden):
        out = _checked_padded_empty("fused_add_rms_norm_pad", input, residual, weight,
                                    padded_hidden)
        return out, input.new_empty(input.shape)
