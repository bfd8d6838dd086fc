"""fuse_act_padding on a gpt-oss-shaped graph built from vLLM 0.26's layers: every residual
add + RMSNorm whose output vLLM's MoE runner pads (hidden 2880 -> 3072 or 2944) becomes one
``vllm_fusion.fused_add_rms_norm_pad``; the router GEMM reads the unpadded view of it."""

from __future__ import annotations

import types

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes

PAD_PASS = "vllm_fusion:RMSNormPadFusionPass"
FUSED_ADD_PAD = "vllm_fusion.fused_add_rms_norm_pad.default"
PLAIN_PAD = "vllm_fusion.rms_norm_pad.default"
PAD = "aten.constant_pad_nd.default"
ADD_NORM = "vllm_ir.fused_add_rms_norm.default"
NORM = "vllm_ir.rms_norm.default"

GPT_OSS = {"hidden_size": 2880, "rms_norm_eps": 1e-5, "head_dim": 64,
           "num_attention_heads": 64, "num_key_value_heads": 8}


def moe_runner_stub(padded_hidden: int):
    """Just what ``MoERunner._maybe_pad_hidden_states`` reads of its runner."""
    return types.SimpleNamespace(
        _quant_method=types.SimpleNamespace(skip_forward_padding=False),
        moe_config=types.SimpleNamespace(hidden_dim=padded_hidden),
        routed_output_transform=None,
    )


class GptOssMoEInputStack(torch.nn.Module):
    """gpt-oss decoder layers (``TransformerBlock`` + ``MLPBlock``) reduced to the MoE input.

    Per layer: input RMSNorm (plain in layer 0, with residual after) -> attention stand-in
    GEMM -> post-attention residual add + RMSNorm -> the router GEMM on the unpadded output
    (vLLM's unquantized GEMM, as its ``ReplicatedLinear`` router runs it) and vLLM's
    ``MoERunner._maybe_pad_hidden_states`` pad of it -> an experts stand-in GEMM from the
    padded width back to the hidden size.
    """

    def __init__(self, hidden: int, padded: int, dtype: torch.dtype, eps: float,
                 num_layers: int = 2, num_experts: int = 32, first_layer_padded: bool = False,
                 all_reduce: bool = False):
        super().__init__()
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.utils import dispatch_unquantized_gemm

        self.num_layers = num_layers
        self.first_layer_padded = first_layer_padded
        self.all_reduce = all_reduce  # TP>1: the attention output is all-reduced
        self.input_norms = torch.nn.ModuleList(
            RMSNorm(hidden, eps=eps, dtype=dtype) for _ in range(num_layers))
        self.post_norms = torch.nn.ModuleList(
            RMSNorm(hidden, eps=eps, dtype=dtype) for _ in range(num_layers))
        self.router_gemm = dispatch_unquantized_gemm()
        self.router_weight = torch.nn.Parameter(
            torch.randn(num_experts, hidden, dtype=dtype), False)
        self.router_bias = torch.nn.Parameter(torch.randn(num_experts, dtype=dtype), False)
        self.runner = moe_runner_stub(padded)
        self.pad_hidden = MoERunner._maybe_pad_hidden_states
        self.w_attn = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False)
        self.w_experts = torch.nn.Parameter(torch.randn(padded, hidden, dtype=dtype), False)

    def moe(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        g = self.router_gemm(self, x, self.router_weight, self.router_bias)
        x, _, _ = self.pad_hidden(self.runner, None, x)
        return x @ self.w_experts + g.sum(dim=-1, keepdim=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in range(self.num_layers):
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_norms[layer](hidden_states)
                if self.first_layer_padded:  # a plain RMSNorm straight into a padded MoE
                    hidden_states = self.moe(hidden_states, layer)
            else:
                hidden_states, residual = self.input_norms[layer](hidden_states, residual)
            hidden_states = hidden_states @ self.w_attn
            if self.all_reduce:
                hidden_states = torch.ops.vllm.all_reduce(hidden_states, group_name="tp:0")
            hidden_states, residual = self.post_norms[layer](hidden_states, residual)
            hidden_states = self.moe(hidden_states, layer)
        return hidden_states + residual


@pytest.fixture(autouse=True)
def hooked(kernels):
    from vllm_fusion.passes.pass_manager_hook import (
        install_pass_config_hook,
        install_pass_manager_hook,
    )

    install_pass_manager_hook()
    install_pass_config_hook()  # vLLM 0.26 turns fuse_act_padding off off-ROCm


def compile_stack(*, hidden=2880, padded=3072, dtype=torch.bfloat16, eps=1e-5, custom=True,
                  pass_config=None, additional_config=None, model=GPT_OSS, tokens=7, **kwargs):
    config = make_vllm_config(
        dtype=dtype,
        custom_ops=["+rms_norm" if custom else "-rms_norm"],
        pass_config={"fuse_act_padding": True} if pass_config is None else pass_config,
        additional_config=additional_config,
        **{**model, "hidden_size": hidden, "rms_norm_eps": eps},
    )
    return run_post_grad_passes(
        lambda: GptOssMoEInputStack(hidden, padded, dtype, eps, **kwargs),
        lambda: [torch.empty(tokens, hidden, dtype=dtype)],
        config,
    )


@pytest.mark.parametrize("padded, custom", [(3072, True), (2944, False)],
                         ids=["3072-custom-ops", "2944-native"])
def test_every_padded_norm_is_fused(padded, custom):
    result = compile_stack(padded=padded, custom=custom)
    assert PAD_PASS in result.passes
    # 2 layers: 2 post-attention norm+pad sites; the input norms are not padded.
    assert result.count(ADD_NORM, after=False) == 3
    assert result.count(NORM, after=False) == 1
    assert result.count(PAD, after=False) == 2
    assert result.matches[PAD_PASS] == 2
    assert result.count(FUSED_ADD_PAD) == 2
    assert result.count(PAD) == 0
    # The two unpadded input norms are left to vLLM's lowering (native ops).
    assert result.count("aten.rsqrt.default") == 2
    # Each router GEMM still runs, on the unpadded view of the fused output.
    assert result.count("aten.addmm.default") == 2
    assert result.count("aten.slice.Tensor", after=False) == 0
    assert result.count("aten.slice.Tensor") == 2


def test_fp16_eps_1e6_and_any_hidden_size():
    # Any hidden size vLLM's MoE backends pad (to a multiple of 64/128/256) is fused.
    result = compile_stack(hidden=4000, padded=4096, dtype=torch.float16, eps=1e-6, model={})
    assert result.matches[PAD_PASS] == 2
    assert result.count(FUSED_ADD_PAD) == 2 and result.count(PAD) == 0


def test_plain_rms_norm_into_a_padded_moe():
    result = compile_stack(first_layer_padded=True)
    assert result.count(PAD, after=False) == 3
    assert result.matches[PAD_PASS] == 3
    assert result.count(PLAIN_PAD) == 1
    assert result.count(FUSED_ADD_PAD) == 2
    assert result.count(PAD) == 0


def test_other_epsilon_is_left_unfused():
    result = compile_stack(eps=1e-3)
    assert result.matches[PAD_PASS] == 0
    assert result.count(PAD) == 2


def test_pad_to_a_size_vllm_does_not_use_is_left_unfused():
    result = compile_stack(padded=2900)
    assert result.matches[PAD_PASS] == 0
    assert result.count(PAD) == 2


def test_flag_off_runs_no_pass():
    result = compile_stack(pass_config={"fuse_act_padding": False})
    assert PAD_PASS not in result.matches
    assert result.count(PAD) == 2 and result.count(FUSED_ADD_PAD) == 0


def test_norm_after_all_reduce_is_left_to_the_allreduce_fusion(monkeypatch):
    import dataclasses

    from vllm_fusion.passes import pass_manager_hook

    resolve = pass_manager_hook.resolve

    def with_ar_fusion(config):  # as with TP>1 and fuse_allreduce_rms on
        settings = resolve(config)
        fusions = {**settings.fusions, "fuse_allreduce_rms": True}
        return dataclasses.replace(settings, fusions=fusions)

    monkeypatch.setattr(pass_manager_hook, "resolve", with_ar_fusion)
    result = compile_stack(all_reduce=True)
    assert result.count("vllm.all_reduce.default", after=False) == 2
    assert result.matches[PAD_PASS] == 0
    assert result.count(PAD) == 2


def test_aiter_kernel_on_rocm_where_installed(monkeypatch):
    """With AITER, the fused-add sites use vLLM's registration of AITER's fused op (vLLM's
    own route on ROCm) with the pad multiple that gives the padded width."""
    from vllm_fusion.passes import rms_pad_fusion

    lib = torch.library.Library("vllm", "FRAGMENT")  # the test runs in a forked child
    lib.define("rocm_aiter_triton_add_rmsnorm_pad(Tensor x, Tensor weight, "
               "float variance_epsilon, Tensor residual, int x_pad_to_multiple) "
               "-> (Tensor, Tensor)")
    calls = []

    def fake(x, weight, variance_epsilon, residual, x_pad_to_multiple):
        calls.append(x_pad_to_multiple)
        hidden = x.shape[-1]
        padded = (hidden + x_pad_to_multiple - 1) // x_pad_to_multiple * x_pad_to_multiple
        return x.new_empty(x.shape[0], padded), torch.empty_like(residual)

    torch.library.register_fake("vllm::rocm_aiter_triton_add_rmsnorm_pad", fake, lib=lib)
    monkeypatch.setattr(rms_pad_fusion, "aiter_pad_op",
                        lambda platform: torch.ops.vllm.rocm_aiter_triton_add_rmsnorm_pad)
    result = compile_stack(padded=3072, first_layer_padded=True)
    assert result.matches[PAD_PASS] == 3
    assert result.count("vllm.rocm_aiter_triton_add_rmsnorm_pad.default") == 2
    assert result.count(FUSED_ADD_PAD) == 0
    assert result.count(PLAIN_PAD) == 1  # AITER has no plain-RMSNorm form
    assert set(calls) == {256}


def test_no_aiter_route_off_rocm():
    from vllm_fusion.passes.rms_pad_fusion import aiter_pad_op, pad_amounts

    assert aiter_pad_op("sm90") is None
    assert pad_amounts(2880) == (64, 192)  # 2944 (128) and 3072 (256); 64 divides 2880
    assert pad_amounts(4096) == ()


# ----------------------------------------------------------------------------- numerics


NUMERICS_CASES = [(dtype, *shape) for dtype in (torch.bfloat16, torch.float16)
                  for shape in ((1, 2880, 3072), (7, 2880, 2944), (33, 200, 256), (0, 64, 128))]


def test_reference_equals_unfused_vllm_on_cpu():
    """The fused op's torch reference against what vLLM computes unfused: its native
    fused_add_rms_norm / rms_norm, then MoERunner's pad. Fresh random inputs, bit-exact."""
    for case in NUMERICS_CASES:
        check_reference_against_unfused(*case)


def check_reference_against_unfused(dtype, tokens, hidden, padded):
    import vllm.ir.ops
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from vllm_fusion.ops import fused_add_rms_norm_pad_ref, rms_norm_pad_ref

    x = torch.randn(tokens, hidden, dtype=dtype) * 3
    residual = torch.randn(tokens, hidden, dtype=dtype)
    weight = torch.rand(hidden, dtype=dtype) + 0.5
    runner = moe_runner_stub(padded)
    for eps in (1e-5, 1e-6):
        y, residual_out = vllm.ir.ops.fused_add_rms_norm.impls["native"].impl_fn(
            x, residual, weight, eps)
        expected, _, _ = MoERunner._maybe_pad_hidden_states(runner, None, y)
        out, res = fused_add_rms_norm_pad_ref(x, residual, weight, eps, padded)
        assert out.shape == (tokens, padded) and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(res, residual_out, rtol=0, atol=0)
        assert not out[:, hidden:].any()

        y = vllm.ir.ops.rms_norm.impls["native"].impl_fn(x, weight, eps)
        expected, _, _ = MoERunner._maybe_pad_hidden_states(runner, None, y)
        torch.testing.assert_close(rms_norm_pad_ref(x, weight, eps, padded), expected,
                                   rtol=0, atol=0)


def test_reference_rejects_a_narrower_padded_size():
    from vllm_fusion.ops import rms_norm_pad_ref

    with pytest.raises(RuntimeError, match="padded_hidden must be at least the hidden size 64"):
        rms_norm_pad_ref(torch.randn(2, 64), torch.ones(64), 1e-6, 32)


# ----------------------------------------------------------------------------- AITER detection


def _fake_module(name: str, **attrs):
    import importlib.machinery

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def test_unrelated_aiter_package_is_not_amds(monkeypatch):
    import sys

    from vllm_fusion import aiter

    # PyPI's "aiter" (async iterators) has the import name but none of AMD's ops.
    monkeypatch.setitem(sys.modules, "aiter", _fake_module("aiter", azip=lambda *a: None))
    monkeypatch.setattr(aiter, "_is_rocm_torch", lambda: True)
    assert aiter.aiter_op("rmsnorm2d_fwd_with_add") is None
    assert not aiter.aiter_available()
    assert not aiter.aiter_available("ops.triton.fused_add_rmsnorm_pad.fused_add_rmsnorm_pad")


def test_amd_aiter_is_found_by_its_ops(monkeypatch):
    import sys

    from vllm_fusion import aiter
    from vllm_fusion.passes.rms_pad_fusion import AITER_PAD_OP

    def fused(*args, **kwargs):
        return None

    for name, attrs in (("aiter", {"rmsnorm2d_fwd_with_add": fused}), ("aiter.ops", {}),
                        ("aiter.ops.triton", {}),
                        ("aiter.ops.triton.fused_add_rmsnorm_pad",
                         {"fused_add_rmsnorm_pad": fused})):
        monkeypatch.setitem(sys.modules, name, _fake_module(name, **attrs))
    assert aiter.aiter_op(AITER_PAD_OP) is fused
    assert aiter.aiter_op("rmsnorm2d_fwd_with_add") is fused
    assert aiter.aiter_op("no_such_op") is None
    monkeypatch.setattr(aiter, "_is_rocm_torch", lambda: False)
    assert not aiter.aiter_available(AITER_PAD_OP)  # AITER's kernels need ROCm
    monkeypatch.setattr(aiter, "_is_rocm_torch", lambda: True)
    assert aiter.aiter_available(AITER_PAD_OP, "rmsnorm2d_fwd_with_add")
    assert not aiter.aiter_available(AITER_PAD_OP, "no_such_op")
    with pytest.raises(ValueError, match="dotted attribute path below 'aiter'"):
        aiter.aiter_op("ops/triton")
