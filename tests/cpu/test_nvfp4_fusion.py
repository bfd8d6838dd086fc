"""NVFP4 in fuse_norm_quant and fuse_act_quant: vLLM 0.26's ``scaled_fp4_quant`` after
RMSNorm / SiLU*Mul becomes one of the package's NVFP4 ops on a simulated SM100, nowhere
else; SiLU+NVFP4 stays with vLLM's own pass unless the package is asked to fuse NVFP4; the
fakes of the new ops."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.fake_platform import simulated_capability
from tests.cpu.models import QuantizedDecoderStack

NORM_PASS = "vllm_fusion:RMSNormQuantFusionPass"
ACT_PASS = "vllm_fusion:ActivationQuantFusionPass"
VLLM_ACT_PASS = "vllm:ActivationQuantFusionPass"
FP4_QUANT = "_C.scaled_fp4_quant.out"
FORCE = {"vllm_fusion": {"force_schemes": True}}
# What a ModelOpt NVFP4 checkpoint's config.json says (vLLM: quantization "modelopt_fp4").
NVFP4_CHECKPOINT = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}


@pytest.fixture(autouse=True)
def hooked(kernels):
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_pass_manager_hook()


def fused(name: str) -> str:
    return f"vllm_fusion.{name}.default"


def compile_nvfp4_stack(capability=(10, 0), *, custom=True, additional_config=FORCE,
                        hidden=256, fp4_pad=0, dtype=torch.bfloat16):
    suffix = "+" if custom else "-"
    with simulated_capability(*capability):
        config = make_vllm_config(
            dtype=dtype,
            custom_ops=[f"{suffix}silu_and_mul"],
            pass_config={"fuse_norm_quant": True, "fuse_act_quant": True},
            additional_config=additional_config,
            quantization_config=NVFP4_CHECKPOINT,
        )
        return run_post_grad_passes(
            lambda: QuantizedDecoderStack(hidden, 2 * hidden, dtype, 1e-6, "nvfp4",
                                          fp4_pad=fp4_pad),
            lambda: [torch.empty(7, hidden, dtype=dtype)],
            config,
        )


# hidden 144: a multiple of 16 but not of 64, so the swizzled scales have padding blocks.
@pytest.mark.parametrize("custom, dtype, hidden", [
    (True, torch.bfloat16, 256), (False, torch.float16, 144)],
    ids=["custom-silu-bf16", "native-silu-fp16-h144"])
def test_every_nvfp4_site_is_fused_on_sm100(custom, dtype, hidden):
    result = compile_nvfp4_stack(custom=custom, dtype=dtype, hidden=hidden)

    # 2 decoder layers: 4 norm+quant sites (1 plain, 3 with residual), 2 SiLU+quant.
    assert result.count(FP4_QUANT, after=False) == 6
    assert result.matches[NORM_PASS] == 4
    assert result.matches[ACT_PASS] == 2
    assert VLLM_ACT_PASS not in result.passes
    assert result.count(fused("rms_norm_nvfp4_quant")) == 1
    assert result.count(fused("fused_add_rms_norm_nvfp4_quant")) == 3
    assert result.count(fused("silu_and_mul_nvfp4_quant")) == 2
    # Nothing left to quantize separately; only the final, unquantized norm remains.
    assert result.count(FP4_QUANT) == 0
    assert result.count("_C.silu_and_mul.default") == 0
    assert result.count("_C.silu_and_mul_nvfp4_quant.default") == 0
    assert result.count("vllm_ir.fused_add_rms_norm.default") == 0
    assert result.count("aten.rsqrt.default") == 1


def test_default_keeps_silu_nvfp4_with_vllm_and_leaves_norm_unfused():
    # Not measured on SM100: the package fuses NVFP4 only when asked; vLLM's pass keeps
    # SiLU+NVFP4 (its own fused kernel).
    result = compile_nvfp4_stack(additional_config={})
    assert result.matches[NORM_PASS] == 0
    assert ACT_PASS not in result.passes
    assert result.matches[VLLM_ACT_PASS] == 2
    assert result.count("_C.silu_and_mul_nvfp4_quant.default") == 2
    assert result.count(FP4_QUANT) == 4
    assert result.count(fused("rms_norm_nvfp4_quant")) == 0


def test_schemes_option_selects_nvfp4_per_fusion():
    result = compile_nvfp4_stack(additional_config={"vllm_fusion": {"schemes": {
        "fuse_act_quant": ["nvfp4"]}}})
    assert result.matches[ACT_PASS] == 2
    assert result.count(fused("silu_and_mul_nvfp4_quant")) == 2
    assert VLLM_ACT_PASS not in result.passes
    assert result.matches[NORM_PASS] == 0  # the norm fusion keeps the matrix's choice
    assert result.count(FP4_QUANT) == 4


def test_nothing_is_replaced_on_sm90():
    # Even with force_schemes: the package's NVFP4 kernels need SM100. SiLU+NVFP4 is left to
    # vLLM's own pass, which fuses it as it would without the package.
    result = compile_nvfp4_stack((9, 0))
    assert result.matches[NORM_PASS] == 0
    assert ACT_PASS not in result.passes
    assert result.matches[VLLM_ACT_PASS] == 2
    assert result.count(FP4_QUANT) == 4
    assert not any(op.startswith("vllm_fusion.") for op in result.ops_after)


def test_padded_quant_buffers_are_left_unfused():
    # scaled_fp4_quant(padded_n=...) writes buffers wider than the fused ops return.
    result = compile_nvfp4_stack(fp4_pad=32)
    assert result.count(FP4_QUANT, after=False) == 6
    assert result.matches[NORM_PASS] == 0
    assert result.matches[ACT_PASS] == 0
    assert result.count(FP4_QUANT) == 6



# ----------------------------------------------------------------------------- fakes


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _contig(shape):
    return torch.empty(shape).stride()


@pytest.mark.parametrize("shape, rows", [((7, 256), 7), ((2, 5, 4096), 10), ((0, 64), 0),
                                         ((130, 48), 130)])
def test_nvfp4_fakes(kernels, shape, rows):
    ops = torch.ops.vllm_fusion
    h = shape[-1]
    q_shape = (rows, h // 2)
    s_shape = ((rows + 127) // 128 * 128, (h // 16 + 3) // 4)
    with FakeTensorMode():
        x, w, gs = _t(*shape), _t(h), _t(1, dtype=torch.float32)
        q, s = ops.rms_norm_nvfp4_quant(x, w, gs, 1e-6)
        assert (tuple(q.shape), q.dtype, q.stride()) == (q_shape, torch.uint8, _contig(q_shape))
        assert (tuple(s.shape), s.dtype, s.stride()) == (s_shape, torch.int32, _contig(s_shape))
        q, r, s = ops.fused_add_rms_norm_nvfp4_quant(x, x, w, gs, 1e-6)
        assert (tuple(q.shape), q.dtype) == (q_shape, torch.uint8)
        assert (r.shape, r.dtype, r.stride()) == (x.shape, torch.bfloat16, x.stride())
        assert (tuple(s.shape), s.dtype) == (s_shape, torch.int32)
        q, s = ops.silu_and_mul_nvfp4_quant(_t(*shape[:-1], 2 * h, dtype=torch.float16), gs)
        assert (tuple(q.shape), q.dtype) == (q_shape, torch.uint8)
        assert (tuple(s.shape), s.dtype) == (s_shape, torch.int32)


def test_nvfp4_fakes_reject_widths_not_multiple_of_16(kernels):
    ops = torch.ops.vllm_fusion
    with FakeTensorMode():
        gs = _t(1, dtype=torch.float32)
        with pytest.raises(RuntimeError, match=r"hidden size .*\(40\) must be a multiple of 16"):
            ops.rms_norm_nvfp4_quant(_t(3, 40), _t(40), gs, 1e-6)
        with pytest.raises(RuntimeError, match=r"output width .*\(24\) must be a multiple of 16"):
            ops.silu_and_mul_nvfp4_quant(_t(3, 48), gs)
