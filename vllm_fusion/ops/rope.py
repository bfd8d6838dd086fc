"""Rotary position embedding of q and k, optionally after a per-head RMSNorm of q and k, with the
write of k and v into the paged KV cache: torch references and the fake impl.

Op (``torch.ops.vllm_fusion.*``, kernels in csrc/rope_kernels.cu)::

    qk_norm_rope_kv_cache(query, key, value, positions, cos_sin_cache, is_neox,
                          q_weight, k_weight, epsilon, key_cache, value_cache,
                          slot_mapping, k_scale, v_scale) -> (q_out, k_out)

* ``query`` ``[T, Hq, D]``, ``key`` ``[T, Hkv, D]``, ``value`` ``[T, Hkv, Dv]``: bfloat16 or
  float16 views (any token / head stride, last stride 1), typically of one qkv tensor.
* ``positions`` ``[T]`` int64 / int32; ``cos_sin_cache`` ``[max_position, rot]`` contiguous,
  float32 / bfloat16 / float16: cos in the first ``rot / 2`` columns, sin in the last (vLLM's
  ``RotaryEmbedding.cos_sin_cache``); ``rot`` even and ``<= D``; dims ``>= rot`` pass through.
* ``q_weight`` / ``k_weight`` ``[D]`` (both or neither): RMSNorm of every q / k head first, as
  vLLM 0.26's ``vllm_ir.rms_norm`` native impl (Qwen3's q_norm / k_norm).
* ``key_cache`` / ``value_cache`` ``[num_blocks, block_size, Hkv, D / Dv]`` with any strides
  (both or neither; the dtype of query, or fp8: float8_e4m3fn on CUDA, float8_e4m3fnuz on
  gfx94x, or uint8 holding those): token ``t < len(slot_mapping)`` with ``slot >= 0`` is written
  at block ``slot // block_size``, offset ``slot % block_size``; k_out's values and value's go
  in as is, or as ``fp8(clamp(x / scale))`` with ``k_scale`` / ``v_scale`` (float32, 1 element).
* ``q_out`` / ``k_out``: contiguous ``[T, Hq, D]`` / ``[T, Hkv, D]`` of the query dtype.

RoPE math: fp32 from the (normalized) dtype values and the cache entries converted to fp32,
NeoX pairs ``(i, i + rot/2)`` or GPT-J pairs ``(2i, 2i+1)``, ``a' = a*cos - b*sin``,
``b' = b*cos + a*sin`` with each product and sum rounded to fp32 (torch eager: no FMA), one
rounding to the dtype at the end. vLLM's own kernel (``_C.rotary_embedding``) computes in the
dtype of query instead, so it may differ from this by one ulp of the dtype.
"""

from __future__ import annotations

import torch

from vllm_fusion.ops.checks import FP8_CACHE_DTYPES, check_rope_kv_cache_args
from vllm_fusion.ops.fp8 import fp8_dtype, fp8_max
from vllm_fusion.ops.norm_quant import rms_norm_ref

OPS = ("qk_norm_rope_kv_cache",)
OP = "qk_norm_rope_kv_cache"


# ----------------------------------------------------------------------------- references


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
             is_neox: bool) -> torch.Tensor:
    """RoPE of ``x`` ``[T, H, D]`` on its first ``rot = cos_sin_cache.shape[1]`` dims, in fp32
    (one rounding to ``x.dtype`` at the end)."""
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos = cos_sin[:, :half].unsqueeze(-2)
    sin = cos_sin[:, half:].unsqueeze(-2)
    x32 = x.float()
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    if is_neox:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        rotated = torch.cat((o1, o2), dim=-1)
    else:
        rotated = torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1).to(x.dtype)


def qk_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                     positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     is_neox: bool) -> torch.Tensor:
    """Per-head RMSNorm (when ``weight`` is given), then RoPE."""
    if weight is not None:
        x = rms_norm_ref(x, weight, epsilon)
    return rope_ref(x, positions, cos_sin_cache, is_neox)


def cache_values_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """What a cache of ``cache_dtype`` stores for ``x``: ``x`` itself, or the fp8 of
    ``clamp(x / scale)`` (uint8 caches hold the platform's fp8 format)."""
    if cache_dtype not in FP8_CACHE_DTYPES:
        return x.to(cache_dtype)
    fp8 = fp8_dtype(device) if cache_dtype == torch.uint8 else cache_dtype
    m = fp8_max(fp8)
    q = (x.float() / scale.float()).clamp(-m, m).to(fp8)
    return q.view(torch.uint8) if cache_dtype == torch.uint8 else q


def kv_cache_write_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """Writes ``key[t]`` / ``value[t]`` into the caches (in place, through their views) for
    every token ``t < len(slot_mapping)`` with ``slot_mapping[t] >= 0``."""
    n = slot_mapping.shape[0]
    tokens = torch.nonzero(slot_mapping >= 0).flatten()
    slots = slot_mapping[tokens]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, scale in ((key[:n], key_cache, k_scale), (value[:n], value_cache, v_scale)):
        cache[blocks, offsets] = cache_values_ref(src[tokens], cache.dtype, scale, cache.device)


def qk_norm_rope_kv_cache_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    epsilon: float,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of ``torch.ops.vllm_fusion.qk_norm_rope_kv_cache``: returns (q_out, k_out) and
    writes the caches in place when they are given."""
    check_rope_kv_cache_args(OP, query, key, value, positions, cos_sin_cache, q_weight, k_weight,
                             key_cache, value_cache, slot_mapping, k_scale, v_scale)
    q_out = qk_norm_rope_ref(query, q_weight, epsilon, positions, cos_sin_cache, is_neox)
    k_out = qk_norm_rope_ref(key, k_weight, epsilon, positions, cos_sin_cache, is_neox)
    if key_cache is not None:
        kv_cache_write_ref(k_out, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    return q_out.contiguous(), k_out.contiguous()


# ----------------------------------------------------------------------------- fake impl


def register_fakes() -> None:
    """Called once by vllm_fusion.ops after the library defined the ops."""

    @torch.library.register_fake("vllm_fusion::qk_norm_rope_kv_cache")
    def _qk_norm_rope_kv_cache_fake(query, key, value, positions, cos_sin_cache, is_neox,
                                    q_weight, k_weight, epsilon, key_cache, value_cache,
                                    slot_mapping, k_scale, v_scale):
        check_rope_kv_cache_args(OP, query, key, value, positions, cos_sin_cache, q_weight,
                                 k_weight, key_cache, value_cache, slot_mapping, k_scale,
                                 v_scale)
        return (query.new_empty((query.shape[0], query.shape[1], query.shape[2])),
                key.new_empty((key.shape[0], key.shape[1], key.shape[2])))
