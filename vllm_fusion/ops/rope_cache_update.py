"""``vllm_fusion::rope_kv_cache_update``: (QK-norm +) RoPE + KV-cache write for compiled graphs.

The compiled graph cannot hold a layer's KV cache or slot mapping (they change per step and
live in vLLM's forward context), so, like vLLM 0.26's own ``vllm::unified_kv_cache_update``,
this op takes the layer name and resolves them when it runs::

    rope_kv_cache_update(query, key, value, positions, cos_sin_cache, is_neox,
                         q_weight, k_weight, epsilon, layer_name)
        -> (q_out, k_out, kv_cache_dummy)

It builds the layer's 4-D key/value cache views exactly as the layer's backend does in its
``do_kv_cache_update`` (FLASH_ATTN, TRITON_ATTN, FLASHINFER: ``kv_cache.transpose(1, 2)
.split(head_size, -1)`` of the logical ``(blocks, kv_heads, block_size, 2 * head_size)`` cache,
whatever its HND/NHD strides) and calls the kernel ``vllm_fusion::qk_norm_rope_kv_cache``.
``kv_cache_dummy`` replaces the result of ``unified_kv_cache_update``: attention takes it as
``kv_cache_dummy_dep`` so that the cache is written before it is read. No argument is declared
mutated: the cache is written as a side effect, as vLLM's own op does.

Importing this module imports vLLM; ``vllm_fusion.ops`` does not import it.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import LayerNameType, _resolve_layer_name

from vllm_fusion.ops.graph_op import register_graph_op

OP_NAME = "rope_kv_cache_update"
KERNEL_OP = "qk_norm_rope_kv_cache"

# Backends whose cache layout and do_kv_cache_update this op reproduces.
SUPPORTED_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")
# kv_cache_dtype strings the kernel writes: the model dtype or fp8 e4m3 with a per-tensor scale.
SUPPORTED_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")
FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_SIZE = 512


def _model_dtype() -> torch.dtype | None:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    model = getattr(config, "model_config", None)
    return getattr(model, "dtype", None)


def rope_kvcache_supported(layer, dtype: torch.dtype | None = None) -> str | None:
    """Why the fused op cannot write ``layer``'s KV cache; None when it can.

    ``dtype`` is the activation dtype (default: the current config's model dtype)."""
    from vllm.v1.attention.backend import AttentionType

    backend = layer.attn_backend.get_name()
    if backend not in SUPPORTED_BACKENDS:
        return f"attention backend {backend} (supported: {', '.join(SUPPORTED_BACKENDS)})"
    if getattr(layer.attn_backend, "forward_includes_kv_cache_update", False):
        return f"attention backend {backend} writes the KV cache inside attention"
    if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
        return f"shares the KV cache of {layer.kv_sharing_target_layer_name}"
    if layer.attn_type != AttentionType.DECODER:
        return f"attention type {layer.attn_type} (only decoder attention)"
    cache_dtype = layer.kv_cache_dtype
    if cache_dtype not in SUPPORTED_CACHE_DTYPES:
        return (f"kv_cache_dtype {cache_dtype} (supported: {', '.join(SUPPORTED_CACHE_DTYPES)}; "
                "no per-token-head quantization)")
    if getattr(getattr(layer, "impl", None), "_is_per_token_head_quant", False):
        return "per-token-head KV-cache quantization"
    dtype = dtype if dtype is not None else _model_dtype()
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: bfloat16, float16)"
    head_size = layer.head_size
    if head_size % 2 or head_size > MAX_HEAD_SIZE:
        return f"head size {head_size} (even and <= {MAX_HEAD_SIZE})"
    return None


def _fp8_cache_dtype() -> torch.dtype:
    from vllm.platforms import current_platform

    return current_platform.fp8_dtype()


def cache_views(layer, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ``[blocks, block_size, kv_heads, head_size]`` key and value cache views.

    FLASH_ATTN, TRITON_ATTN and FLASHINFER (vLLM 0.26 and 0.33) all pack K and V in the last dim of
    the logical ``(blocks, kv_heads, block_size, 2 * head_size)`` cache; an fp8 cache is
    allocated as uint8 and viewed as the platform's fp8 dtype, as TRITON_ATTN does."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(layer.head_size, dim=-1)
    if layer.kv_cache_dtype in FP8_CACHE_DTYPES:
        fp8 = _fp8_cache_dtype()
        key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
    return key_cache, value_cache


def _kernel():
    return getattr(torch.ops.vllm_fusion, KERNEL_OP).default


def rope_kv_cache_update_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    epsilon: float,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, layer, kv_cache, slot_mapping = get_attention_context(_resolve_layer_name(layer_name))
    key_cache = value_cache = k_scale = v_scale = None
    if slot_mapping is not None:
        key_cache, value_cache = cache_views(layer, kv_cache)
        if layer.kv_cache_dtype in FP8_CACHE_DTYPES:
            k_scale, v_scale = layer._k_scale, layer._v_scale
    else:  # profiling run: no cache yet, norm + RoPE only
        slot_mapping = None
    q_out, k_out = _kernel()(
        query, key, value, positions, cos_sin_cache, is_neox, q_weight, k_weight, epsilon,
        key_cache, value_cache, slot_mapping, k_scale, v_scale,
    )
    dummy = torch.empty(0, device=kv_cache.device, dtype=kv_cache.dtype)
    return q_out, k_out, dummy


def rope_kv_cache_update_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    epsilon: float,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    # As vllm::unified_kv_cache_update's fake: the cache dtype is not known here.
    return q_out, k_out, torch.empty(0, dtype=query.dtype, device=query.device)


register_graph_op(OP_NAME, rope_kv_cache_update_impl, rope_kv_cache_update_fake)
