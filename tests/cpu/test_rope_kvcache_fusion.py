"""fuse_rope_kvcache on Llama- and Qwen3-shaped attention built from vLLM 0.26's own layers
(QKVParallelLinear, get_rope, per-head RMSNorm, Attention calling unified_kv_cache_update):
every supported layer's (QK-norm +) RoPE + KV-cache write becomes one
``vllm_fusion.rope_kv_cache_update``; and the configuration the fusion needs (the cache update
kept in the graph, the rotary custom op, the flag kept on CUDA)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import (
    AttentionStack,
    attention_model_args,
    compile_attention_stack,
    init_single_process_parallel,
)
from tests.cpu.rope_kernel_shim import ensure_rope_kernel_op
from vllm_fusion import compat

ROPE_PASS = "vllm_fusion:RopeKVCacheFusionPass"
FUSED = "vllm_fusion.rope_kv_cache_update.default"
ROTARY = "_C.rotary_embedding.default"
KV_UPDATE = "vllm.unified_kv_cache_update.default"
ATTENTION = "vllm.unified_attention_with_output.default"
NORM = "vllm_ir.rms_norm.default"
# What vLLM's IR lowering (after the passes) turns a remaining rms_norm into.
RSQRT = "aten.rsqrt.default"
KV_SPLIT = "vllm::unified_kv_cache_update"
MLA_KV_SPLIT = "vllm::unified_mla_kv_cache_update"

GQA = {"head_size": 64, "num_heads": 4, "num_kv_heads": 2}
MHA = {"head_size": 128, "num_heads": 2, "num_kv_heads": 2}


@pytest.fixture(autouse=True)
def hooked(pass_hook):
    from vllm_fusion.passes.pass_manager_hook import (
        install_pass_config_hook,
        install_splitting_ops_hook,
    )

    ensure_rope_kernel_op()
    install_pass_config_hook()  # vLLM 0.26 turns fuse_rope_kvcache off off-ROCm
    install_splitting_ops_hook()


def compile_attention(*, pass_config=None, geometry=GQA, qk_norm_eps=None, is_neox=True,
                      rotary_dim=None, backend="FLASH_ATTN", cache_dtype="auto",
                      dtype=torch.bfloat16, compilation=None, tokens=7, num_layers=2,
                      kv_sharing_last=False):
    """Compile an AttentionStack with the package's hooks and return the pass run."""
    config = make_vllm_config(
        dtype=dtype, compilation=compilation,
        pass_config={"fuse_rope_kvcache": True} if pass_config is None else pass_config,
        **attention_model_args(geometry))
    config.cache_config.cache_dtype = cache_dtype
    return compile_attention_stack(config, dtype=dtype, tokens=tokens, is_neox=is_neox,
                                   rotary_dim=rotary_dim, qk_norm_eps=qk_norm_eps,
                                   backend=backend, num_layers=num_layers,
                                   kv_sharing_last=kv_sharing_last, **geometry)


def fused_calls(result) -> list[str]:
    return [line for line in result.graph_after.splitlines()
            if "vllm_fusion.rope_kv_cache_update.default" in line]


def assert_all_fused(result, layers=2):
    assert result.count(ROTARY, after=False) == layers
    assert result.count(KV_UPDATE, after=False) == layers
    assert result.matches[ROPE_PASS] == layers
    assert result.count(FUSED) == layers
    assert result.count(ROTARY) == 0 and result.count(KV_UPDATE) == 0
    assert result.count(ATTENTION) == layers


# ---------------------------------------------------------------- Llama: RoPE + KV cache

# Each compile costs seconds: the cases combine variations (geometry, rotary style, partial
# rotary, dtype, backend, cache dtype) rather than crossing them.
@pytest.mark.parametrize("geometry, is_neox, rotary_dim, dtype, layers", [
    (GQA, True, None, torch.bfloat16, 2),
    (MHA, False, 64, torch.float16, 3),  # GPT-J style, partial rotary, fp16
], ids=["gqa-neox", "mha-gptj-partial-fp16"])
def test_every_llama_layer_is_fused(geometry, is_neox, rotary_dim, dtype, layers):
    result = compile_attention(geometry=geometry, is_neox=is_neox, rotary_dim=rotary_dim,
                               dtype=dtype, num_layers=layers)
    assert ROPE_PASS in result.passes
    assert_all_fused(result, layers)
    for call in fused_calls(result):
        # (q, k, v, positions, cos_sin_cache, is_neox, q_weight, k_weight, eps, layer_name)
        assert f", {is_neox}, None, None, 0.0, " in call, call


# vLLM 0.33's FlashInferImpl.__init__ sizes a buffer from the CUDA device's SM count and
# allocates it on CUDA, so its layer cannot be built without a GPU.
FLASHINFER_NEEDS_CUDA = pytest.mark.skipif(
    compat.release() is not compat.VLLM_0_26,
    reason="vLLM 0.33's FlashInferImpl queries and allocates on the CUDA device when built")


@pytest.mark.parametrize("backend, cache_dtype", [
    ("TRITON_ATTN", "fp8"), pytest.param("FLASHINFER", "bfloat16", marks=FLASHINFER_NEEDS_CUDA),
    ("FLASH_ATTN", "fp8_e4m3")])
def test_other_supported_backends_and_cache_dtypes(backend, cache_dtype):
    assert_all_fused(compile_attention(backend=backend, cache_dtype=cache_dtype))


def test_two_geometries_in_one_model_each_fused_with_its_own_sizes():
    # A GQA stack then an MHA one (q_size 256 both, k/v sizes differ): each layer is fused
    # by the pattern of its own geometry, whose split sizes the extra check compares.
    from vllm.config import set_current_vllm_config

    config = make_vllm_config(pass_config={"fuse_rope_kvcache": True})
    with set_current_vllm_config(config):
        init_single_process_parallel()

    class TwoGeometries(torch.nn.Module):
        def __init__(self):
            super().__init__()
            common = {"hidden": 256, "dtype": torch.bfloat16, "cache_config": config.cache_config}
            self.gqa = AttentionStack(**common, **GQA, num_layers=1)
            self.mha = AttentionStack(**common, **MHA, num_layers=2, prefix="model.mha")

        def forward(self, positions, x):
            return self.mha(positions, self.gqa(positions, x))

    result = run_post_grad_passes(
        TwoGeometries, lambda: [torch.zeros(5, dtype=torch.int64),
                                torch.empty(5, 256, dtype=torch.bfloat16)],
        config, dynamic_dims={0: 0, 1: 0})
    assert_all_fused(result, layers=3)
    calls = fused_calls(result)
    # The k/v views fed to the kernel carry each layer's own head counts.
    assert sum("[-1, 2, 64]" in line for line in result.graph_after.splitlines()) >= 2
    assert sum("[-1, 2, 128]" in line for line in result.graph_after.splitlines()) >= 4
    assert len(calls) == 3


# ---------------------------------------------------------------- Qwen3: QK-norm + RoPE + KV cache

@pytest.mark.parametrize("eps, is_neox, geometry, rotary_dim", [
    (1e-6, True, GQA, None), (1e-5, False, MHA, 64)], ids=["1e-6-neox-gqa", "1e-5-gptj-mha"])
def test_every_qwen3_layer_is_fused_with_its_norms(eps, is_neox, geometry, rotary_dim):
    result = compile_attention(qk_norm_eps=eps, is_neox=is_neox, geometry=geometry,
                               rotary_dim=rotary_dim)
    assert result.count(NORM, after=False) == 4
    assert_all_fused(result)
    assert result.count(RSQRT) == 0  # the norms were not lowered: they are gone
    for call in fused_calls(result):
        assert f", {is_neox}, %arg" in call and f", {eps}, %arg" in call, call
        assert "None, None" not in call, call


def test_other_epsilon_is_not_fused():
    # The epsilon is part of the pattern: a norm with another one is not taken by 1e-6's.
    result = compile_attention(qk_norm_eps=1e-4)
    assert result.matches[ROPE_PASS] == 0
    assert result.count(FUSED) == 0 and result.count(KV_UPDATE) == 2
    assert result.count(RSQRT) == 4  # vLLM lowers the unfused norms after the passes


# ---------------------------------------------------------------- unsupported layers

def test_unsupported_backend_is_left_unfused(vllm_logs):
    result = compile_attention(backend="FLEX_ATTENTION")
    assert result.matches.get(ROPE_PASS, 0) == 0
    assert result.count(FUSED) == 0 and result.count(KV_UPDATE) == 2
    assert "attention backend FLEX_ATTENTION" in vllm_logs.text


def test_kv_sharing_layer_has_no_cache_write_and_the_others_fuse():
    result = compile_attention(kv_sharing_last=True, num_layers=3)
    # The sharing layer writes no cache (vLLM emits no update for it): 2 sites, 2 fused.
    assert result.count(KV_UPDATE, after=False) == 2
    assert result.matches[ROPE_PASS] == 2 and result.count(FUSED) == 2
    # Its RoPE stays as it is.
    assert result.count(ROTARY) == 1


def test_extra_check_rejects_a_layer_the_kernel_cannot_serve(monkeypatch):
    from vllm_fusion.passes import rope_kvcache_fusion

    calls = []

    def only_layer_0(layer, dtype=None):
        calls.append(layer.layer_name)
        return None if layer.layer_name.endswith("layers.0.self_attn.attn") else "test veto"

    monkeypatch.setattr(rope_kvcache_fusion, "rope_kvcache_supported", only_layer_0)
    result = compile_attention()
    assert result.matches[ROPE_PASS] == 1
    assert result.count(FUSED) == 1 and result.count(KV_UPDATE) == 1 and result.count(ROTARY) == 1
    assert "model.layers.1.self_attn.attn" in calls


# ---------------------------------------------------------------- the configuration it needs

def test_explicit_flag_keeps_the_cache_update_in_the_graph(vllm_logs):
    config = make_vllm_config(pass_config={"fuse_rope_kvcache": True})
    compilation = config.compilation_config
    assert compilation.pass_config.fuse_rope_kvcache is True
    assert KV_SPLIT not in compilation.splitting_ops
    assert MLA_KV_SPLIT in compilation.splitting_ops  # as vLLM wants it
    assert "vllm::unified_attention_with_output" in compilation.splitting_ops
    assert "+rotary_embedding" in compilation.custom_ops
    assert f"keeps {KV_SPLIT} in the compiled graph" in vllm_logs.text
    assert "Disabling fuse_rope_kvcache" not in vllm_logs.text


def test_without_the_flag_vllms_splitting_is_unchanged():
    config = make_vllm_config()
    compilation = config.compilation_config
    assert not compilation.pass_config.fuse_rope_kvcache
    assert KV_SPLIT in compilation.splitting_ops
    assert "+rotary_embedding" not in compilation.custom_ops


def test_vllm_alone_turns_the_flag_off_on_cuda():
    # What the PassConfig hook prevents: vLLM 0.26 forces it off outside ROCm.
    from vllm.config.compilation import PassConfig

    from vllm_fusion.passes.pass_manager_hook import _WRAPPED

    original = getattr(PassConfig.__post_init__, "__wrapped__", None)
    assert getattr(PassConfig.__post_init__, _WRAPPED, False) and original is not None
    unhooked = PassConfig.__new__(PassConfig)
    object.__setattr__(unhooked, "__dict__", dict(PassConfig().__dict__, fuse_rope_kvcache=True))
    original(unhooked)
    assert unhooked.fuse_rope_kvcache is False
    assert PassConfig(fuse_rope_kvcache=True).fuse_rope_kvcache is True


def test_user_splitting_ops_with_the_cache_update_turn_it_off_with_one_warning(vllm_logs):
    from vllm.config import CompilationConfig

    from vllm_fusion.config import resolve

    splitting = [*CompilationConfig._attention_ops, KV_SPLIT]
    result = compile_attention(compilation={"splitting_ops": splitting})
    assert result.config.compilation_config.splitting_ops == splitting
    assert ROPE_PASS not in result.passes
    assert result.count(ROTARY) == 2 and result.count(KV_UPDATE) == 2
    assert not resolve(result.config).fusions["fuse_rope_kvcache"]
    warnings = [r.getMessage() for r in vllm_logs.records
                if r.levelno == logging.WARNING and "compilation_config.splitting_ops" in
                r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("vllm_fusion: fuse_rope_kvcache is turned off on sm90: ")
    assert f"contains {KV_SPLIT}" in warnings[0] and "remove it from splitting_ops" in warnings[0]


def test_empty_splitting_ops_need_nothing():
    config = make_vllm_config(pass_config={"fuse_rope_kvcache": True},
                              compilation={"splitting_ops": []})
    assert config.compilation_config.splitting_ops == []
    assert config.compilation_config.pass_config.fuse_rope_kvcache is True
    from vllm_fusion.config import resolve

    assert resolve(config).fusions["fuse_rope_kvcache"]


def test_level_default_on_also_gets_the_rotary_custom_op(monkeypatch):
    """When the matrix turns either fusion on by default (default_on), the rotary custom op
    and the splitting come with it, as for an explicit flag."""
    import dataclasses

    from vllm_fusion import matrix, resolver
    from vllm_fusion.passes.pass_manager_hook import install_level_defaults

    full = matrix.load_full_matrix()
    fusions = dict(full.fusions)
    for flag in ("fuse_rope_kvcache", "enable_qk_norm_rope_fusion"):
        fusions[flag] = dataclasses.replace(fusions[flag], default_on=True)
    patched = dataclasses.replace(full, fusions=fusions)
    monkeypatch.setattr(resolver, "load_full_matrix", lambda: patched)
    install_level_defaults()
    config = make_vllm_config(optimization_level=2)
    compilation = config.compilation_config
    assert compilation.pass_config.fuse_rope_kvcache is True
    assert compilation.pass_config.enable_qk_norm_rope_fusion is True
    assert "+rotary_embedding" in compilation.custom_ops
    assert KV_SPLIT not in compilation.splitting_ops
    assert compilation.is_custom_op_enabled("rotary_embedding")


def test_matrix_default_is_off_at_every_level():
    from vllm_fusion.passes.pass_manager_hook import install_level_defaults

    install_level_defaults()
    config = make_vllm_config(optimization_level=3)
    assert config.compilation_config.pass_config.fuse_rope_kvcache is False
    assert config.compilation_config.pass_config.enable_qk_norm_rope_fusion is False
