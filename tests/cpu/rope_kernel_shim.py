"""Stand-in schema + fake for ``vllm_fusion::qk_norm_rope_kv_cache`` while the kernel library
lacks it. Delete this file once the kernel (and its fake in vllm_fusion/ops/rope.py) is merged:
``ensure_rope_kernel_op`` then does nothing anyway.
"""

from __future__ import annotations

import torch

SCHEMA = (
    "qk_norm_rope_kv_cache(Tensor query, Tensor key, Tensor value, Tensor positions, "
    "Tensor cos_sin_cache, bool is_neox, Tensor? q_weight, Tensor? k_weight, float epsilon, "
    "Tensor(a!)? key_cache, Tensor(b!)? value_cache, Tensor? slot_mapping, Tensor? k_scale, "
    "Tensor? v_scale) -> (Tensor, Tensor)"
)

_lib = None


def rope_kernel_op_exists() -> bool:
    if not hasattr(torch.ops.vllm_fusion, "qk_norm_rope_kv_cache"):
        return False
    try:
        torch.ops.vllm_fusion.qk_norm_rope_kv_cache.default
    except (AttributeError, RuntimeError):
        return False
    return True


def rope_kernel_fake_exists() -> bool:
    from torch._library.simple_registry import singleton

    return singleton.find("vllm_fusion::qk_norm_rope_kv_cache").fake_impl.kernel is not None


def ensure_rope_kernel_op() -> None:
    """Define the op (schema) unless the kernel library has it, and its fake unless
    vllm_fusion.ops registered one."""
    global _lib
    import vllm_fusion.ops  # noqa: F401  (loads the kernel library and its fakes when built)

    if rope_kernel_op_exists() and rope_kernel_fake_exists():
        return
    _lib = torch.library.Library("vllm_fusion", "FRAGMENT")
    if not rope_kernel_op_exists():
        _lib.define(SCHEMA)

    @torch.library.register_fake("vllm_fusion::qk_norm_rope_kv_cache", lib=_lib)
    def _fake(query, key, value, positions, cos_sin_cache, is_neox, q_weight, k_weight,
              epsilon, key_cache, value_cache, slot_mapping, k_scale, v_scale):
        return (torch.empty(query.shape, dtype=query.dtype, device=query.device),
                torch.empty(key.shape, dtype=key.dtype, device=key.device))
