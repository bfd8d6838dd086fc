"""The CPU graph harness, checked on vLLM's own unmodified RMSNormQuantFusionPass:
it must match what vLLM says that pass matches, so later tests can trust it."""

from __future__ import annotations

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import QuantizedDecoderStack

# The package stays out of the way: vLLM's passes only.
VLLM_ONLY = {"vllm_fusion": {"enabled": False}}


def run(scheme: str, custom_quant: bool, dtype=torch.bfloat16, eps=1e-6, tokens=7):
    config = make_vllm_config(
        dtype=dtype,
        custom_ops=["+quant_fp8" if custom_quant else "-quant_fp8", "+silu_and_mul"],
        pass_config={"fuse_norm_quant": True, "fuse_act_quant": False},
        additional_config=VLLM_ONLY,
    )
    return run_post_grad_passes(
        lambda: QuantizedDecoderStack(256, 512, dtype, eps, scheme),
        lambda: [torch.empty(tokens, 256, dtype=dtype)],
        config,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_static_fp8_custom_quant(dtype, eps):
    result = run("fp8-static", True, dtype, eps)
    assert result.passes == ["vllm:NoOpEliminationPass", "vllm:RMSNormQuantFusionPass"]
    assert result.matches["vllm:RMSNormQuantFusionPass"] == 4
    assert result.count("_C.static_scaled_fp8_quant.default", after=False) == 6
    # The SiLU site's quant is not RMSNorm's: it stays.
    assert result.count("_C.static_scaled_fp8_quant.default") == 2
    assert result.count("_C.rms_norm_static_fp8_quant.default") == 1
    assert result.count("_C.fused_add_rms_norm_static_fp8_quant.default") == 3
    assert result.count("vllm_ir.rms_norm.default", after=False) == 1
    assert result.count("vllm_ir.fused_add_rms_norm.default", after=False) == 4


def test_static_fp8_native_quant():
    result = run("fp8-static", False)
    assert result.matches["vllm:RMSNormQuantFusionPass"] == 4
    assert result.count("aten.reciprocal.default", after=False) == 6
    assert result.count("_C.fused_add_rms_norm_static_fp8_quant.default") == 3


def test_per_token_fp8():
    result = run("fp8-per-token", True)
    assert result.matches["vllm:RMSNormQuantFusionPass"] == 4
    assert result.count("_C.rms_norm_dynamic_per_token_quant.default") == 4


def test_group_fp8_custom_quant():
    result = run("fp8-group128", True)
    assert result.matches["vllm:RMSNormQuantFusionPass"] == 4
    assert result.count("_C.rms_norm_per_block_quant.default") == 4


def test_group_fp8_native_quant_is_not_fused_by_vllm():
    # vLLM 0.26 never fuses per-group quantization written in native torch.
    result = run("fp8-group128", False)
    assert result.matches["vllm:RMSNormQuantFusionPass"] == 0
    assert result.count("vllm_ir.fused_add_rms_norm.default", after=False) == 4


def test_unfused_graph_keeps_the_norms_unlowered_until_the_manager_lowers_them():
    config = make_vllm_config(
        custom_ops=["+quant_fp8"],
        pass_config={"fuse_norm_quant": False, "fuse_act_quant": False},
        additional_config=VLLM_ONLY,
    )
    result = run_post_grad_passes(
        lambda: QuantizedDecoderStack(256, 512, torch.bfloat16, 1e-6, "fp8-static"),
        lambda: [torch.empty(7, 256, dtype=torch.bfloat16)],
        config,
    )
    assert result.matches == {}
    assert result.count("vllm_ir.fused_add_rms_norm.default", after=False) == 4
    # IR lowering (native provider) leaves no vllm_ir node behind.
    assert not any(op.startswith("vllm_ir.") for op in result.ops_after)
