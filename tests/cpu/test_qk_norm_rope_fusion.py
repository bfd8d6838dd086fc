"""enable_qk_norm_rope_fusion on Qwen3-shaped attention built from vLLM 0.26's own layers:
each layer's per-head q/k RMSNorm + RoPE becomes one ``vllm_fusion.qk_norm_rope_kv_cache``
without caches (the KV-cache update stays where vLLM puts it); with fuse_rope_kvcache also
on, the RoPE + KV-cache pass (which runs first) takes the three together."""

from __future__ import annotations

import pytest

from tests.cpu.test_rope_kvcache_fusion import (
    ATTENTION,
    FUSED,
    GQA,
    KV_UPDATE,
    NORM,
    ROPE_PASS,
    ROTARY,
    RSQRT,
    compile_attention,
    hooked,  # noqa: F401  (autouse fixture)
)

QK_PASS = "vllm_fusion:QKNormRoPEFusionPass"
QK_FUSED = "vllm_fusion.qk_norm_rope_kv_cache.default"
ONLY_QK = {"enable_qk_norm_rope_fusion": True}


def qk_calls(result) -> list[str]:
    return [line for line in result.graph_after.splitlines() if QK_FUSED in line]


@pytest.mark.parametrize("eps, is_neox, geometry, rotary_dim", [
    (1e-6, True, GQA, None),
    # Head size 80 (vLLM's kernel takes 64/128/256 only), GPT-J style, partial rotary.
    (1e-5, False, {"head_size": 80, "num_heads": 4, "num_kv_heads": 1}, 40),
], ids=["1e-6-neox-64", "1e-5-gptj-80-partial"])
def test_every_qwen3_layer_is_fused(eps, is_neox, geometry, rotary_dim):
    result = compile_attention(pass_config=ONLY_QK, qk_norm_eps=eps, is_neox=is_neox,
                               geometry=geometry, rotary_dim=rotary_dim)
    assert QK_PASS in result.passes and ROPE_PASS not in result.passes
    assert result.count(NORM, after=False) == 4 and result.count(ROTARY, after=False) == 2
    assert result.matches[QK_PASS] == 2
    assert result.count(QK_FUSED) == 2
    assert result.count(RSQRT) == 0 and result.count(ROTARY) == 0
    # The cache update is not part of this fusion.
    assert result.count(KV_UPDATE) == 2 and result.count(ATTENTION) == 2
    for call in qk_calls(result):
        # (..., is_neox, q_weight, k_weight, eps, key_cache, value_cache, slot_mapping, k/v scale)
        assert f", {is_neox}, %arg" in call and f", {eps}, None, None, None, None, None)" in call


def test_llama_without_norms_is_left_alone():
    result = compile_attention(pass_config=ONLY_QK)
    assert result.matches[QK_PASS] == 0
    assert result.count(ROTARY) == 2 and result.count(QK_FUSED) == 0


def test_other_epsilon_is_left_alone():
    result = compile_attention(pass_config=ONLY_QK, qk_norm_eps=1e-4)
    assert result.matches[QK_PASS] == 0 and result.count(RSQRT) == 4


def test_with_the_cache_fusion_the_three_fuse_together():
    result = compile_attention(
        pass_config={"enable_qk_norm_rope_fusion": True, "fuse_rope_kvcache": True},
        qk_norm_eps=1e-6)
    assert result.passes.index(ROPE_PASS) < result.passes.index(QK_PASS)
    assert result.matches[ROPE_PASS] == 2 and result.matches[QK_PASS] == 0
    assert result.count(FUSED) == 2 and result.count(QK_FUSED) == 0
    assert result.count(RSQRT) == 0 and result.count(KV_UPDATE) == 0


def test_flag_gets_the_rotary_custom_op_and_leaves_the_splitting_to_vllm():
    from tests.cpu.compile_harness import make_vllm_config

    config = make_vllm_config(pass_config=ONLY_QK, custom_ops=["-rms_norm"])
    compilation = config.compilation_config
    assert compilation.pass_config.enable_qk_norm_rope_fusion is True
    assert "+rotary_embedding" in compilation.custom_ops
    assert "vllm::unified_kv_cache_update" in compilation.splitting_ops
