"""The kernels' input checks as the fakes run them (same conditions, same words as
csrc/), and the passes fusing only what the kernels accept: a model the kernels cannot
take compiles unfused instead of failing."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import QuantizedDecoderStack
from tests.kernel_input_cases import BAD_CALLS

NORM_PASS = "vllm_fusion:RMSNormQuantFusionPass"
ACT_PASS = "vllm_fusion:ActivationQuantFusionPass"


@pytest.fixture(autouse=True)
def hooked(kernels):
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_pass_manager_hook()


def test_every_op_has_bad_input_cases():
    from vllm_fusion.ops import OPS

    assert {case.op for case in BAD_CALLS} == set(OPS)


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c.id for c in BAD_CALLS])
def test_fake_rejects_with_the_kernels_message(case):
    with FakeTensorMode():
        args = case.args("cuda")
        with pytest.raises(RuntimeError) as excinfo:
            getattr(torch.ops.vllm_fusion, case.op)(*args)
    assert case.message in str(excinfo.value)


def test_valid_inputs_pass_the_checks():
    with FakeTensorMode():
        x, w = torch.empty(3, 203, dtype=torch.float16, device="cuda"), torch.empty(
            203, dtype=torch.float16, device="cuda")
        q = torch.ops.vllm_fusion.rms_norm_static_fp8_quant(
            x, w, torch.ones(1, device="cuda"), 1e-6)
        assert q.shape == (3, 203)


def compile_stack(scheme, *, dtype=torch.bfloat16, hidden=256, intermediate=None, fuse=True):
    config = make_vllm_config(
        dtype=dtype,
        custom_ops=["+quant_fp8", "+silu_and_mul"],
        pass_config={"fuse_norm_quant": fuse, "fuse_act_quant": fuse},
        additional_config={"vllm_fusion": {"force_schemes": True}},
    )
    return run_post_grad_passes(
        lambda: QuantizedDecoderStack(hidden, intermediate or 2 * hidden, dtype, 1e-6, scheme),
        lambda: [torch.empty(7, hidden, dtype=dtype)],
        config,
    )


@pytest.mark.parametrize("scheme", ["fp8-static", "fp8-per-token"])
def test_float32_model_compiles_unfused(scheme):
    # The kernels take bfloat16/float16 activations only; vLLM runs float32 models.
    result = compile_stack(scheme, dtype=torch.float32)
    assert result.matches == {NORM_PASS: 0, ACT_PASS: 0}
    assert result.graph_after == compile_stack(scheme, dtype=torch.float32, fuse=False).graph_after


@pytest.mark.parametrize("scheme", ["fp8-static", "fp8-per-token"])
def test_odd_hidden_sizes_are_fused(scheme):
    # Widths that are not a multiple of the 16-byte vector take the kernels' scalar path.
    result = compile_stack(scheme, hidden=203, intermediate=101)
    assert result.matches == {NORM_PASS: 4, ACT_PASS: 2}


@pytest.mark.parametrize("scale", [False, True])
def test_all_reduce_base_call_passes_the_checks(scale):
    # Each all_reduce_rms_norm bad case changes one argument of this call.
    from tests.kernel_input_cases import _all_reduce
    from vllm_fusion.ops import fp8_dtype

    with FakeTensorMode():
        args = _all_reduce("cuda", scale=torch.ones(1, device="cuda") if scale else None)
        out, residual_out = torch.ops.vllm_fusion.all_reduce_rms_norm(*args)
    assert out.shape == residual_out.shape == (4, 256)
    assert out.dtype == (fp8_dtype(out.device) if scale else torch.bfloat16)
    assert residual_out.dtype == torch.bfloat16
