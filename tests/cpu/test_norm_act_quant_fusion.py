"""fuse_norm_quant and fuse_act_quant on graphs built from vLLM 0.26's layers:
every RMSNorm+quant and SiLU*Mul+quant site becomes one of the package's ops,
for each scheme, with vLLM's custom ops on and off."""

from __future__ import annotations

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import QuantizedDecoderStack

NORM_PASS = "vllm_fusion:RMSNormQuantFusionPass"
ACT_PASS = "vllm_fusion:ActivationQuantFusionPass"

# scheme -> (vLLM op that quantizes when custom ops are on, fused op names)
EXPECTED = {
    "fp8-static": ("_C.static_scaled_fp8_quant.default",
                   ("rms_norm_static_fp8_quant", "fused_add_rms_norm_static_fp8_quant",
                    "silu_and_mul_static_fp8_quant")),
    "fp8-per-token": ("_C.dynamic_per_token_scaled_fp8_quant.default",
                      ("rms_norm_dynamic_fp8_quant", "fused_add_rms_norm_dynamic_fp8_quant",
                       "silu_and_mul_dynamic_fp8_quant")),
}
for _group in ("fp8-group128", "fp8-group128-colmajor", "fp8-group64"):
    EXPECTED[_group] = ("_C.per_token_group_fp8_quant.default", EXPECTED["fp8-per-token"][1])


@pytest.fixture(autouse=True)
def hooked(kernels):
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_pass_manager_hook()


# Pattern tests fuse every scheme; which ones run by default is the matrix's call.
ALL_SCHEMES = {"vllm_fusion": {"force_schemes": True}}


def compile_stack(scheme, custom, *, dtype=torch.bfloat16, eps=1e-6, hidden=256,
                  norm_dtype=None, pass_config=None, additional_config=ALL_SCHEMES):
    suffix = "+" if custom else "-"
    config = make_vllm_config(
        dtype=dtype,
        custom_ops=[f"{suffix}quant_fp8", f"{suffix}silu_and_mul"],
        pass_config=pass_config or {"fuse_norm_quant": True, "fuse_act_quant": True},
        additional_config=additional_config,
    )
    return run_post_grad_passes(
        lambda: QuantizedDecoderStack(hidden, 2 * hidden, dtype, eps, scheme,
                                      norm_dtype=norm_dtype),
        lambda: [torch.empty(7, hidden, dtype=dtype)],
        config,
    )


def fused(name: str) -> str:
    return f"vllm_fusion.{name}.default"


@pytest.mark.parametrize("custom", [True, False], ids=["custom-ops", "native"])
@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_every_site_is_fused(scheme, custom):
    result = compile_stack(scheme, custom)
    quant_op, (rms_op, add_rms_op, silu_op) = EXPECTED[scheme]

    # 2 decoder layers: 4 norm+quant sites (1 plain, 3 with residual), 2 SiLU+quant.
    assert result.matches[NORM_PASS] == 4
    assert result.matches[ACT_PASS] == 2
    assert result.count(fused(rms_op)) == 1
    assert result.count(fused(add_rms_op)) == 3
    assert result.count(fused(silu_op)) == 2

    if custom:
        assert result.count(quant_op, after=False) == 6
        assert result.count("_C.silu_and_mul.default", after=False) == 2
    assert result.count("vllm_ir.fused_add_rms_norm.default", after=False) == 4
    # Nothing is left to quantize separately; only the final, unquantized norm remains.
    assert result.count(quant_op) == 0
    assert result.count("_C.silu_and_mul.default") == 0
    assert result.count("aten.reciprocal.default") == 0
    # Only the final norm, which has no quant after it, is lowered to native ops.
    assert result.count("aten.rsqrt.default") == 1


@pytest.mark.parametrize("scheme", ["fp8-static", "fp8-per-token"])
def test_fp16_and_eps_1e5(scheme):
    result = compile_stack(scheme, True, dtype=torch.float16, eps=1e-5)
    assert result.matches[NORM_PASS] == 4
    assert result.matches[ACT_PASS] == 2


def test_other_epsilon_is_left_unfused():
    # Patterns carry eps as a constant; vLLM models use 1e-5 or 1e-6.
    result = compile_stack("fp8-static", True, eps=1e-3)
    assert result.matches[NORM_PASS] == 0
    assert result.matches[ACT_PASS] == 2


def test_weight_dtype_unlike_input_is_left_unfused():
    result = compile_stack("fp8-static", True, norm_dtype=torch.float32)
    assert result.matches[NORM_PASS] == 0
    assert result.count("vllm_ir.fused_add_rms_norm.default", after=False) == 4


def test_odd_hidden_size_fuses_per_token():
    result = compile_stack("fp8-per-token", False, hidden=200)
    assert result.matches[NORM_PASS] == 4
    assert result.matches[ACT_PASS] == 2


def test_only_the_enabled_fusion_runs():
    result = compile_stack("fp8-static", True,
                           pass_config={"fuse_norm_quant": False, "fuse_act_quant": True})
    assert NORM_PASS not in result.matches
    assert result.matches[ACT_PASS] == 2
    assert result.count("_C.static_scaled_fp8_quant.default") == 4


def test_scheme_the_matrix_leaves_to_inductor_keeps_vllms_graph_exactly():
    # Static FP8 on sm90 at -O2: the package's passes run but must change nothing, so the
    # graph Inductor compiles is byte for byte the one plain vLLM gives it.
    plugin = compile_stack("fp8-static", False, additional_config={})
    vllm_alone = compile_stack("fp8-static", False, additional_config={},
                               pass_config={"fuse_norm_quant": False, "fuse_act_quant": False})
    assert plugin.matches == {NORM_PASS: 0, ACT_PASS: 0}
    assert NORM_PASS not in vllm_alone.matches
    assert plugin.graph_after == vllm_alone.graph_after
    assert plugin.ops_after == vllm_alone.ops_after


@pytest.mark.parametrize("scheme, expected_norm, expected_act", [
    ("fp8-static", 0, 0), ("fp8-per-token", 0, 2), ("fp8-group128", 4, 2)])
def test_matrix_decides_which_schemes_fuse_by_default(scheme, expected_norm, expected_act):
    # On sm90 the matrix measured Inductor faster for static scales, and for RMSNorm with
    # per-token scales at decode sizes; the other sites are fused.
    result = compile_stack(scheme, False, additional_config={})
    assert result.matches[NORM_PASS] == expected_norm
    assert result.matches[ACT_PASS] == expected_act
