"""All-reduce + residual add + RMSNorm (+ static FP8): torch reference, input checks and fake.

Kernel op (``torch.ops.vllm_fusion``, csrc/allreduce_kernels.cu)::

    all_reduce_rms_norm(input, residual, weight, epsilon, scale, buffers, counter, rank,
                        capacity, two_shot, push=False) -> (out, residual_out)

``push`` (one-shot only): each rank writes its rows into every rank's buffer before the flag
and sums from its own memory, instead of reading the peers' buffers after it; it needs
world x message bytes of ``capacity``.

``buffers`` are every rank's peer-addressable workspace addresses and ``counter`` this rank's
call counter (see :mod:`vllm_fusion.ops.allreduce_workspace`, which owns both). ``out`` is the
normalized all-reduced input (fp8 when ``scale`` is given), ``residual_out`` the all-reduced
input plus ``residual`` (or the all-reduced input alone when there is no residual), as vLLM 0.26
computes ``all_reduce`` followed by ``vllm_ir.fused_add_rms_norm`` / ``rms_norm`` and QuantFP8.
"""

from __future__ import annotations

import torch

from vllm_fusion.ops.checks import (
    _fail,
    _known,
    check_norm_args,
    check_same_device,
    check_scale_scalar,
)
from vllm_fusion.ops.fp8 import fp8_dtype, static_fp8_quant_ref
from vllm_fusion.ops.norm_quant import fused_add_rms_norm_ref, rms_norm_ref

OP = "all_reduce_rms_norm"
OPS = (OP,)

MAX_RANKS = 8
# The kernel's row limit: 512 threads x 4 vectors of 8 elements.
MAX_HIDDEN = 16384
VECTOR = 8


def all_reduce_ref(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The all-reduce as the kernel computes it: fp32 sum in rank order, rounded once."""
    total = torch.zeros_like(inputs[0], dtype=torch.float32)
    for x in inputs:
        total = total + x.float()
    return total.to(inputs[0].dtype)


def all_reduce_rms_norm_ref(
    inputs: list[torch.Tensor],
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    epsilon: float,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out) of every rank, given each rank's input (rank order)."""
    reduced = all_reduce_ref(inputs)
    if residual is None:
        out, residual_out = rms_norm_ref(reduced, weight, epsilon), reduced
    else:
        out, residual_out = fused_add_rms_norm_ref(reduced, residual, weight, epsilon)
    if scale is not None:
        out = static_fp8_quant_ref(out, scale)
    return out, residual_out


def check_all_reduce_rms_norm_args(op: str, input, residual, weight, scale, buffers, counter,
                                   rank, capacity, two_shot=False, push=False) -> None:
    """The checks of all_reduce_rms_norm in csrc/allreduce_kernels.cu, in its order."""
    check_norm_args(op, input, residual, weight)
    if not input.is_contiguous():
        _fail(op, "input must be contiguous")
    if residual is not None and not residual.is_contiguous():
        _fail(op, "residual must be contiguous")
    hidden = input.shape[-1]
    if scale is not None:
        check_scale_scalar(op, "scale", scale, input)
    if _known(hidden) and (hidden % VECTOR or hidden > MAX_HIDDEN):
        _fail(op, f"the last dim of input must be a multiple of {VECTOR} and at most "
                  f"{MAX_HIDDEN}, got {hidden}")
    world = len(buffers)
    if not 2 <= world <= MAX_RANKS:
        _fail(op, f"buffers must hold one address per rank, 2 to {MAX_RANKS} ranks, got {world}")
    if not 0 <= rank < world:
        _fail(op, f"rank must be in [0, {world}), got {rank}")
    if any(b == 0 or b % 16 for b in buffers):
        _fail(op, "every buffer address must be 16-byte aligned")
    if capacity <= 0 or capacity % 16:
        _fail(op, f"capacity must be a positive multiple of 16 bytes, got {capacity}")
    check_same_device(op, "counter", counter, input)
    if counter.dtype != torch.int64 or (_known(counter.numel()) and counter.numel() < 2):
        _fail(op, "counter must be an int64 tensor of at least 2 elements")
    numel = input.numel()
    if _known(numel) and numel * input.element_size() > capacity:
        rows = numel // hidden
        _fail(op, f"{rows} x {hidden} elements do not fit the workspace ({capacity} bytes)")
    if push and two_shot:
        _fail(op, "push is a one-shot algorithm; two_shot must be False")
    if push and _known(numel) and world * numel * input.element_size() > capacity:
        _fail(op, f"push needs one slot per rank: {world} x {numel // hidden} x {hidden} "
                  f"elements do not fit the workspace ({capacity} bytes)")


def register_fakes() -> None:
    """Called once by vllm_fusion.ops after the library defined the ops."""

    @torch.library.register_fake(f"vllm_fusion::{OP}")
    def _all_reduce_rms_norm_fake(input, residual, weight, epsilon, scale, buffers, counter,
                                  rank, capacity, two_shot, push=False):
        check_all_reduce_rms_norm_args(OP, input, residual, weight, scale, buffers, counter,
                                       rank, capacity, two_shot, push)
        dtype = fp8_dtype(input.device) if scale is not None else input.dtype
        return torch.empty_like(input, dtype=dtype), torch.empty_like(input)
