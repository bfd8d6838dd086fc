"""Per-head RMSNorm of q and k + RoPE -> one kernel (``enable_qk_norm_rope_fusion``).

Qwen3-like attention computes, before attention::

    q, k, v = split(qkv, [q_size, k_size, v_size], -1)
    q = vllm_ir.rms_norm(q.view(..., H, D), q_weight, eps).view(q.shape)     # same for k
    q, k = _C.rotary_embedding(positions, q, k, D, cos_sin_cache, is_neox)

With vLLM's default splitting ops the KV-cache update runs outside the compiled graph, so
this pass fuses only the norms and the rotary: ``vllm_fusion.qk_norm_rope_kv_cache`` without
caches, whose q_out / k_out replace the rotated q and k. Where the cache update is in the
graph and ``fuse_rope_kvcache`` is on, that pass (which runs first) has already fused the
three together. The matching follows vLLM's ``QkNormRopePattern``, for any head size the
kernel takes (even, <= 512), not only vLLM's 64/128/256.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.ops.rope_cache_update import MAX_HEAD_SIZE, SUPPORTED_DTYPES
from vllm_fusion.passes.quant_schemes import EPSILONS
from vllm_fusion.passes.rope_kvcache_fusion import (
    Geometry,
    RopeFusionPass,
    RopePattern,
    attention_layers,
    geometries,
)

logger = init_logger(__name__)


class QKNormRoPEPattern(RopePattern):
    """split -> per-head RMSNorm of q and k -> rotary; (q, k, v) out."""

    def get_inputs(self) -> list[torch.Tensor]:
        return self.tensor_inputs()

    @property
    def pattern(self):
        def pattern(qkv, positions, cos_sin_cache, q_weight, k_weight):
            q, k, v = self.split(qkv)
            q, k = self.norm_and_rope(q, k, positions, cos_sin_cache, q_weight, k_weight)
            return q, k, v
        return pattern

    @property
    def replacement(self):
        def replacement(qkv, positions, cos_sin_cache, q_weight, k_weight):
            q, k, v = self.split(qkv)
            q_heads, k_heads, v_heads = self.heads(q, k, v)
            q_out, k_out = torch.ops.vllm_fusion.qk_norm_rope_kv_cache.default(
                q_heads, k_heads, v_heads, positions, cos_sin_cache, self.is_neox, q_weight,
                k_weight, self.epsilon, None, None, None, None, None)
            return q_out.view(-1, self.q_size), k_out.view(-1, self.k_size), v
        return replacement


def kernel_takes(geometry: Geometry) -> bool:
    return geometry.head_size % 2 == 0 and geometry.head_size <= MAX_HEAD_SIZE


class QKNormRoPEFusionPass(RopeFusionPass):
    """``enable_qk_norm_rope_fusion``: QK-norm + RoPE -> one kernel (no KV cache)."""

    flag = "enable_qk_norm_rope_fusion"
    name = "qk_norm_rope_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        if self.model_dtype not in SUPPORTED_DTYPES:
            logger.warning_once("vllm_fusion: %s: model dtype %s is not bfloat16/float16; "
                                "nothing is fused", self.flag, self.model_dtype)
            return
        found = geometries(attention_layers(config).values())
        for geometry in found:
            if not kernel_takes(geometry):
                logger.debug("vllm_fusion: %s skips head size %d (even, <= %d)", self.flag,
                             geometry.head_size, MAX_HEAD_SIZE)
        # vLLM's RotaryEmbedding calls FlashInfer's rotary when it is set to.
        flashinfer = (False, True) if RotaryEmbedding.enabled() else (False,)
        for geometry in (g for g in found if kernel_takes(g)):
            for epsilon in EPSILONS:
                for is_neox in (True, False):
                    for use_flashinfer in flashinfer:
                        self.register(QKNormRoPEPattern(geometry, is_neox, epsilon,
                                                        self.model_dtype, use_flashinfer))
        self.dump_patterns(config, self.pm_pass)
