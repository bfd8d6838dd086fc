"""fuse_attn_quant on Llama-shaped attention built from vLLM 0.26's own layers (Attention with
its real backend impls) whose output feeds an FP8 o_proj (static input quant): every layer whose
backend writes FP8 output gets ``output_scale`` and an FP8 output buffer, and the quant is gone;
other backends' layers stay unfused, with the reason logged."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import (
    AttentionStack,
    attention_model_args,
    compile_attention_stack,
    init_single_process_parallel,
)

ATTN_PASS = "vllm_fusion:AttnQuantFusionPass"
VLLM_ATTN_PASS = "vllm:AttnQuantFusionPass"
ATTENTION = "vllm.unified_attention_with_output.default"
CUSTOM_QUANT = "_C.static_scaled_fp8_quant.default"
# What vLLM's native static quant (QuantFP8.forward_native) leaves: x * (1 / scale), clamps,
# cast.
NATIVE_RECIPROCAL = "aten.reciprocal.default"
NATIVE_CLAMP = "aten.clamp_max.default"
FP8 = torch.float8_e4m3fn

GQA = {"head_size": 64, "num_heads": 4, "num_kv_heads": 2}
MHA = {"head_size": 128, "num_heads": 2, "num_kv_heads": 2}


pytestmark = pytest.mark.usefixtures("pass_hook")


def compile_attention(*, backend="TRITON_ATTN", custom_quant=True, dtype=torch.bfloat16,
                      geometry=GQA, num_layers=2, pass_config=None, tokens=7,
                      kv_sharing_last=False, additional_config=None):
    config = make_vllm_config(
        dtype=dtype, custom_ops=["+quant_fp8"] if custom_quant else ["-quant_fp8"],
        pass_config={"fuse_attn_quant": True} if pass_config is None else pass_config,
        additional_config=additional_config, **attention_model_args(geometry))
    return compile_attention_stack(config, dtype=dtype, tokens=tokens, backend=backend,
                                   num_layers=num_layers, o_proj_fp8=True,
                                   kv_sharing_last=kv_sharing_last, **geometry)


def attention_calls(result) -> list[str]:
    return [line for line in result.graph_after.splitlines()
            if "vllm.unified_attention_with_output.default" in line]


def fp8_outputs(result) -> list[str]:
    """The attention output buffers allocated as FP8 ``[T, H, Dv]`` (the fused layers'; the
    custom quant's own FP8 result is ``[T, H * Dv]``)."""
    return [line for line in result.graph_after.splitlines()
            if re.search(r"aten\.empty\.memory_format\]\(args = \(\[%\w+, \d+, \d+\],\)", line)
            and f"dtype: {FP8}" in line]


def attn_pass(result):
    return next(p for p in result.manager.passes if type(p).__name__ == "AttnQuantFusionPass"
                and type(p).__module__.startswith("vllm_fusion"))


def assert_fused(result, layers, quant_op):
    assert result.count(ATTENTION, after=False) == layers
    assert result.count(quant_op, after=False) == layers
    assert result.matches[ATTN_PASS] == layers
    assert result.count(quant_op) == 0
    assert result.count(ATTENTION) == layers
    calls = attention_calls(result)
    assert len(calls) == layers
    for call in calls:
        assert "output_scale: %" in call, call
        assert "output_block_scale: None" in call, call
    assert len(fp8_outputs(result)) == layers


# ---------------------------------------------------------------- TRITON_ATTN: fused

@pytest.mark.parametrize("custom_quant, dtype, geometry, layers", [
    (True, torch.bfloat16, GQA, 2),
    (False, torch.float16, MHA, 3),
], ids=["custom-op-bf16-gqa", "native-fp16-mha"])
def test_every_triton_layer_writes_fp8(custom_quant, dtype, geometry, layers):
    result = compile_attention(custom_quant=custom_quant, dtype=dtype, geometry=geometry,
                               num_layers=layers)
    assert ATTN_PASS in result.passes and VLLM_ATTN_PASS not in result.passes
    assert_fused(result, layers, CUSTOM_QUANT if custom_quant else NATIVE_RECIPROCAL)
    if not custom_quant:
        assert result.count(NATIVE_CLAMP, after=False) == layers and result.count(NATIVE_CLAMP) == 0
    # The bf16/fp16 output buffers are gone: only the FP8 ones are allocated.
    assert result.count("aten.empty.memory_format") == layers
    assert sorted(attn_pass(result).layer_matches.items()) == [
        (f"model.layers.{i}.self_attn.attn", 1) for i in range(layers)]
    # The FP8 outputs are [T, H, Dv] and are read back as [T, H * Dv].
    heads, dv = geometry["num_heads"], geometry["head_size"]
    assert all(f", {heads}, {dv}]" in line for line in fp8_outputs(result))
    reshapes = re.findall(r"aten\.reshape\.default\]\(args = \(%getitem\w*, \[-1, (\d+)\]",
                          result.graph_after)
    assert reshapes.count(str(heads * dv)) == layers


def test_the_quant_scale_becomes_the_output_scale():
    result = compile_attention(num_layers=1)
    scale = re.search(r"output_scale: %(\w+)", attention_calls(result)[0]).group(1)
    # The o_proj's static scale (a graph input), not a new tensor.
    assert re.search(rf"%{scale} : \[num_users=\d+\] = placeholder", result.graph_after)
    # No MLA layers: vLLM's MLA pass for the same flag is not built.
    assert not any(type(p).__name__ == "MLAAttnQuantFusionPass" for p in result.manager.passes)


def test_a_kv_sharing_layer_without_cache_dependency_is_fused_too():
    result = compile_attention(num_layers=3, kv_sharing_last=True)
    assert result.matches[ATTN_PASS] == 3
    assert result.count(CUSTOM_QUANT) == 0


# ---------------------------------------------------------------- unfused layers

def test_flash_attn_layers_stay_unfused_with_the_reason(vllm_logs):
    result = compile_attention(backend="FLASH_ATTN")
    assert result.matches.get(ATTN_PASS, 0) == 0
    assert result.count(CUSTOM_QUANT) == 2 and not fp8_outputs(result)
    assert all("output_scale: None" in call for call in attention_calls(result))
    assert ("skips model.layers.0.self_attn.attn: attention backend FLASH_ATTN "
            "(FlashAttentionImpl) cannot write fp8-static output") in vllm_logs.text


def test_a_flash_attn_layer_beside_triton_layers_stays_unfused(vllm_logs):
    from vllm.config import set_current_vllm_config

    config = make_vllm_config(custom_ops=["+quant_fp8"], pass_config={"fuse_attn_quant": True})
    with set_current_vllm_config(config):
        init_single_process_parallel()

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            common = {"hidden": 256, "dtype": torch.bfloat16, "cache_config": config.cache_config,
                      "o_proj_fp8": True, **GQA}
            self.triton = AttentionStack(**common, backend="TRITON_ATTN", num_layers=2)
            self.fa = AttentionStack(**common, backend="FLASH_ATTN", num_layers=1,
                                     prefix="model.fa")

        def forward(self, positions, x):
            return self.fa(positions, self.triton(positions, x))

    result = run_post_grad_passes(
        Mixed, lambda: [torch.zeros(5, dtype=torch.int64),
                        torch.empty(5, 256, dtype=torch.bfloat16)],
        config, dynamic_dims={0: 0, 1: 0})
    # One pattern (layer names are graph inputs) reaches every layer: the check keeps FA out.
    assert result.matches[ATTN_PASS] == 2
    assert result.count(CUSTOM_QUANT) == 1 and len(fp8_outputs(result)) == 2
    assert set(attn_pass(result).layer_matches) == {
        "model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"}
    assert "skips model.fa.0.self_attn.attn: attention backend FLASH_ATTN" in vllm_logs.text
    # The match on the FA layer is vetoed with the same reason (not "layer not found").
    assert ("fuse_attn_quant leaves model.fa.0.self_attn.attn unfused: attention backend "
            "FLASH_ATTN") in vllm_logs.text
    assert "attention layer" not in vllm_logs.text


def test_flag_off_leaves_the_graph_alone():
    result = compile_attention(pass_config={})
    assert ATTN_PASS not in result.passes and VLLM_ATTN_PASS not in result.passes
    assert result.count(CUSTOM_QUANT) == 2 and not fp8_outputs(result)
    assert result.count(ATTENTION) == 2 and "output_scale: %" not in result.graph_after


# ---------------------------------------------------------------- the configuration it needs

def test_the_flag_keeps_attention_in_the_graph():
    config = make_vllm_config(pass_config={"fuse_attn_quant": True})
    compilation = config.compilation_config
    # vLLM's own arrangement for this flag: no splitting, full CUDA graphs.
    assert compilation.splitting_ops == []
    assert compilation.cudagraph_mode.name == "FULL"

    from vllm_fusion.config import resolve

    settings = resolve(config)
    assert settings.fusions["fuse_attn_quant"] and "fuse_attn_quant" not in settings.delegated


def test_vllms_mla_pass_is_kept_beside_the_package_pass(monkeypatch):
    from vllm_fusion.passes import attn_quant_fusion

    class FakeMLAPass:
        def is_applicable_for_range(self, compile_range):
            return True

        def __call__(self, graph):
            pass

        def uuid(self):
            return "fake-mla"

    monkeypatch.setattr(attn_quant_fusion, "vllm_mla_passes", lambda config: [FakeMLAPass()])
    result = compile_attention(num_layers=1)
    names = [type(p).__name__ for p in result.manager.passes]
    assert names[names.index("AttnQuantFusionPass") + 1] == "FakeMLAPass"
    assert result.matches[ATTN_PASS] == 1


# ---------------------------------------------------------------- who runs it where

@pytest.mark.parametrize("platform, quant, implementation, route", [
    ("sm90", "fp8-static", "vllm_fusion", "vllm_fusion"),
    ("sm100", "fp8-static", "vllm_fusion", "vllm_fusion"),
    # NVFP4 output (FlashInfer trtllm-gen): vLLM's own pass keeps it.
    ("sm100", "nvfp4", "vllm", "vllm"),
    # ROCm backends write FP8 output through vLLM's pass.
    ("gfx942", "fp8-static", "vllm", "vllm"),
    ("gfx950", "fp8-static", "vllm", "vllm"),
])
def test_explicit_flag_is_run_by_the_package_on_cuda_and_by_vllm_elsewhere(
        platform, quant, implementation, route):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    flag = "fuse_attn_quant"
    d = resolve_fusion(flag, simulated_setup(platform, quant=quant, level=2, flags={flag: True}))
    assert d.enabled and d.status == "on", d
    assert (d.implementation, d.route) == (implementation, route), d


@pytest.mark.parametrize("platform, status", [("sm80", "off"), ("gfx90a", "off")])
def test_no_fp8_platform_turns_an_explicit_flag_off(platform, status):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    flag = "fuse_attn_quant"
    d = resolve_fusion(flag, simulated_setup(platform, quant="fp8-static", flags={flag: True}))
    assert d.status == status and d.warning.startswith(f"{flag} is turned off on {platform}: ")


@pytest.mark.parametrize("level", [1, 2, 3])
def test_off_by_default_at_every_level(level):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    d = resolve_fusion("fuse_attn_quant", simulated_setup("sm90", quant="fp8-static", level=level))
    assert not d.enabled and "measured slower end to end" in d.reason


# ---------------------------------------------------------------- graph forms

def test_output_flattened_by_token_count_is_fused_too():
    """A caller that flattens the attention output to ``[num_tokens, H * Dv]`` (the form
    vLLM's own pattern is written for) instead of Attention.forward's ``[-1, H * Dv]``."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import _encode_layer_name

    config = make_vllm_config(custom_ops=["+quant_fp8"], pass_config={"fuse_attn_quant": True})
    with set_current_vllm_config(config):
        init_single_process_parallel()
    heads, d = GQA["num_heads"], GQA["head_size"]

    class DirectCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = AttentionStack(hidden=256, dtype=torch.bfloat16, o_proj_fp8=True,
                                        cache_config=config.cache_config, num_layers=1,
                                        backend="TRITON_ATTN", **GQA)

        def forward(self, q, k, v):
            layer = self.stack.attn[0]
            out = torch.empty(q.shape[0], heads, d, dtype=q.dtype, device=q.device)
            torch.ops.vllm.unified_attention_with_output(
                q, k, v, out, _encode_layer_name(layer.layer_name))
            return self.stack.o_proj(out.view(q.shape[0], heads * d))

    def inputs():
        return [torch.empty(5, heads, d, dtype=torch.bfloat16),
                torch.empty(5, GQA["num_kv_heads"], d, dtype=torch.bfloat16),
                torch.empty(5, GQA["num_kv_heads"], d, dtype=torch.bfloat16)]

    result = run_post_grad_passes(DirectCall, inputs, config, dynamic_dims={0: 0, 1: 0, 2: 0})
    assert result.matches[ATTN_PASS] == 1
    assert result.count(CUSTOM_QUANT) == 0 and len(fp8_outputs(result)) == 1
    assert attn_pass(result).layer_matches == {"model.layers.0.self_attn.attn": 1}


# ---------------------------------------------------------------- the backend table

@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASH_ATTN"])
def test_backend_table_agrees_with_vllms_backends(backend):
    """The matrix's per-backend "takes the fused output" column is what vLLM's impl answers."""
    from vllm.config import set_current_vllm_config

    from vllm_fusion.matrix import load_matrix
    from vllm_fusion.passes.attn_quant_fusion import output_quant_unsupported

    config = make_vllm_config(custom_ops=["+quant_fp8"], pass_config={"fuse_attn_quant": True})
    with set_current_vllm_config(config):
        init_single_process_parallel()
        stack = AttentionStack(hidden=256, dtype=torch.bfloat16, o_proj_fp8=True, num_layers=1,
                               cache_config=config.cache_config, backend=backend, **GQA)
    row = load_matrix()["fuse_attn_quant"].backends[backend]
    assert (output_quant_unsupported(stack.attn[0]) is None) == row.writes_fp8_output


def test_triton_on_h100_is_recorded_as_slower():
    from vllm_fusion.matrix import load_matrix

    row = load_matrix()["fuse_attn_quant"].backends["TRITON_ATTN"]
    assert not row.measured["sm90"].wins
    assert "2.7% slower" in row.measured_loss("sm90")
    assert row.measured_loss("sm100") is None  # not measured there: no claim


def test_an_explicit_flag_fuses_a_measured_loser_and_warns_once(vllm_logs):
    result = compile_attention(num_layers=2)  # the CPU tests simulate sm90
    assert result.matches[ATTN_PASS] == 2
    warnings = [r.getMessage() for r in vllm_logs.records if r.levelno == logging.WARNING
                and "measured slower than unfused" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("vllm_fusion: fuse_attn_quant fuses TRITON_ATTN layers as "
                                  "pass_config asks, but on sm90 it was measured slower")
    assert "0.5253 s fused vs 0.5115 s unfused" in warnings[0]


def test_no_warning_for_a_backend_that_is_not_fused(vllm_logs):
    compile_attention(backend="FLASH_ATTN")
    assert "measured slower than unfused" not in vllm_logs.text


@pytest.mark.parametrize("row, message", [
    ({"reason": "r"}, "writes_fp8_output (true/false) and reason are required"),
    ({"writes_fp8_output": True, "reason": "r", "measured": {"sm42": {"wins": True, "text": "t"}}},
     "unknown platform 'sm42'"),
    ({"writes_fp8_output": True, "reason": "r", "measured": {"sm90": {"text": "t"}}},
     "measured.sm90: wins (true/false) and text are required"),
])
def test_bad_backend_rows_are_rejected(row, message):
    from vllm_fusion.matrix import MatrixError, _backends

    with pytest.raises(MatrixError, match=re.escape(message)):
        _backends({"X": row}, "fusions.f.backends", {"sm90": object()})
