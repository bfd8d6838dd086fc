"""``vllm_fusion::fused_all_reduce_rms_norm``: the op compiled graphs call for ``fuse_allreduce_rms``.

::

    fused_all_reduce_rms_norm(input, residual, weight, epsilon, scale, group_name, max_bytes,
                              one_shot_bytes, push_bytes=0) -> (out, residual_out)

It replaces ``vllm.all_reduce(input, group_name)`` followed by ``fused_add_rms_norm`` /
``rms_norm`` (and static FP8 quant when ``scale`` is given). ``group_name`` is vLLM's
GroupCoordinator name (``tp:0``), as in ``vllm.all_reduce``. On first use on a group the op makes
the group's workspace (:mod:`vllm_fusion.ops.allreduce_workspace`, ``max_bytes`` per message);
messages up to ``one_shot_bytes`` take the one-shot kernel, larger ones the two-shot kernel;
messages up to ``push_bytes`` (0: none) take the one-shot kernel's push variant where the
workspace holds one slot per rank.
Messages over the workspace, and groups without a workspace, run vLLM's own all-reduce followed by
this package's norm kernels: same results, unfused.

Importing this module imports vLLM; ``vllm_fusion.ops`` does not import it.
"""

from __future__ import annotations

import torch

from vllm_fusion.ops import allreduce_workspace
from vllm_fusion.ops.fp8 import fp8_dtype
from vllm_fusion.ops.graph_op import register_graph_op

OP_NAME = "fused_all_reduce_rms_norm"
_OPS = torch.ops.vllm_fusion


def _group(group_name: str):
    from vllm.distributed.parallel_state import _groups

    ref = _groups.get(group_name)
    group = ref() if ref is not None else None
    if group is None:
        raise RuntimeError(f"vllm_fusion::{OP_NAME}: no vLLM process group named {group_name!r}")
    return group


def _workspace(group, input: torch.Tensor, max_bytes: int):
    return allreduce_workspace.get_workspace(
        group.unique_name, group.device_group, max_bytes, input.device, group.cpu_group)


def _vllm_all_reduce(input: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.ops.vllm.all_reduce(input, group_name=group_name)


def _unfused(input, residual, weight, epsilon, scale, group_name):
    """vLLM's all-reduce, then the same norm (+ quant) math in this package's kernels."""
    reduced = _vllm_all_reduce(input, group_name)
    hidden = input.shape[-1]
    if scale is not None:
        if residual is None:
            return _OPS.rms_norm_static_fp8_quant(reduced, weight, scale, epsilon), reduced
        return _OPS.fused_add_rms_norm_static_fp8_quant(reduced, residual, weight, scale,
                                                        epsilon)
    if residual is None:
        return _OPS.rms_norm_pad(reduced, weight, epsilon, hidden), reduced
    return _OPS.fused_add_rms_norm_pad(reduced, residual, weight, epsilon, hidden)


def fused_all_reduce_rms_norm_impl(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    epsilon: float,
    scale: torch.Tensor | None,
    group_name: str,
    max_bytes: int,
    one_shot_bytes: int,
    push_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    group = _group(group_name)
    workspace = _workspace(group, input, max_bytes)
    if workspace is None or not workspace.fits(input):
        return _unfused(input, residual, weight, epsilon, scale, group_name)
    nbytes = input.numel() * input.element_size()
    two_shot = nbytes > one_shot_bytes
    push = not two_shot and nbytes <= push_bytes and workspace.fits_push(input)
    return _OPS.all_reduce_rms_norm(
        input.contiguous(), None if residual is None else residual.contiguous(), weight,
        epsilon, scale, workspace.buffers, workspace.counter, workspace.rank,
        workspace.capacity, two_shot, push)


def fused_all_reduce_rms_norm_fake(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    epsilon: float,
    scale: torch.Tensor | None,
    group_name: str,
    max_bytes: int,
    one_shot_bytes: int,
    push_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = fp8_dtype(input.device) if scale is not None else input.dtype
    return (torch.empty(input.shape, dtype=dtype, device=input.device),
            torch.empty(input.shape, dtype=input.dtype, device=input.device))


register_graph_op(OP_NAME, fused_all_reduce_rms_norm_impl, fused_all_reduce_rms_norm_fake)
