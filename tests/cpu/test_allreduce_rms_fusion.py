"""fuse_allreduce_rms on a simulated TP2 decoder stack built from vLLM 0.26's layers: every
``vllm.all_reduce`` followed by ``RMSNorm`` (with or without residual, with or without a
static ``QuantFP8``) becomes one ``vllm_fusion::fused_all_reduce_rms_norm``; what the kernel
cannot take stays unfused; the resolver's gate, the compile-range endpoint and the op's fake."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.cpu.compile_harness import run_post_grad_passes
from tests.cpu.models import GROUP, AllReduceDecoderStack, make_tp_config, simulate_gpus

AR_PASS = "vllm_fusion:AllReduceFusionPass"
FUSED = "vllm_fusion.fused_all_reduce_rms_norm.default"
ALL_REDUCE = "vllm.all_reduce.default"
RMS_NORM = "vllm_ir.rms_norm.default"
ADD_RMS_NORM = "vllm_ir.fused_add_rms_norm.default"
STATIC_QUANT = "_C.static_scaled_fp8_quant.default"
# What vLLM's IR lowering (after the passes) turns a remaining norm into.
RSQRT = "aten.rsqrt.default"


@pytest.fixture(autouse=True)
def hooked(pass_hook, monkeypatch):
    from vllm_fusion.passes import allreduce_rms_fusion
    from vllm_fusion.passes.pass_manager_hook import install_compile_ranges_hook

    simulate_gpus(8)
    # No TP group on CPU: the name vLLM's all_reduce nodes carry.
    monkeypatch.setattr(allreduce_rms_fusion, "tp_group_name", lambda: GROUP)
    install_compile_ranges_hook()


def compile_stack(*, tp=2, quant=False, custom=True, dtype=torch.bfloat16, eps=1e-6,
                  hidden=256, num_layers=2, compile_range=(4096, 8192), pass_config=None):
    config = make_tp_config(
        tp=tp, dtype=dtype, custom_ops=["+quant_fp8" if custom else "-quant_fp8"],
        pass_config={"fuse_allreduce_rms": True} if pass_config is None else pass_config,
        hidden_size=hidden)
    return run_post_grad_passes(
        lambda: AllReduceDecoderStack(hidden, dtype, eps, quant, num_layers),
        lambda: [torch.empty(7, hidden, dtype=dtype)],
        config,
        compile_range=compile_range,
    )


def fused_args(result) -> list[list[str]]:
    """The arguments of each fused node, as the post-grad graph prints them."""
    marker = "fused_all_reduce_rms_norm.default](args = ("
    return [line.split(marker, 1)[1].split("), kwargs")[0].split(", ")
            for line in result.graph_after.splitlines() if marker in line]


def assert_unfused(result, num_layers=2, *, pass_runs=True):
    """Nothing fused; ``pass_runs``: the pass is in vLLM's list (it ran and refused)."""
    sites = 1 + 2 * num_layers
    assert (AR_PASS in result.passes) == pass_runs, result.passes
    assert result.matches.get(AR_PASS, 0) == 0
    assert result.count(FUSED) == 0
    assert result.count(ALL_REDUCE) == sites
    assert result.count(RSQRT) == sites  # every norm lowered by vLLM


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_every_all_reduce_norm_site_is_fused(eps, dtype):
    result = compile_stack(eps=eps, dtype=dtype)

    assert AR_PASS in result.passes
    # 2 layers: the embedding's site (rms_norm), 3 fused-add sites, the final norm.
    assert result.matches[AR_PASS] == 5
    assert result.count(ALL_REDUCE, after=False) == 5
    assert result.count(RMS_NORM, after=False) == 1
    assert result.count(ADD_RMS_NORM, after=False) == 4
    assert result.count(FUSED) == 5
    for op in (ALL_REDUCE, RMS_NORM, ADD_RMS_NORM, RSQRT):
        assert result.count(op) == 0, op


@pytest.mark.parametrize("num_layers", [1, 3])
def test_match_count_follows_the_layers(num_layers):
    result = compile_stack(num_layers=num_layers)
    assert result.matches[AR_PASS] == 1 + 2 * num_layers
    assert result.count(FUSED) == 1 + 2 * num_layers
    assert result.count(ALL_REDUCE) == 0


@pytest.mark.parametrize("custom", [True, False], ids=["custom-op", "native"])
def test_static_fp8_quant_is_fused_into_the_epilogue(custom):
    result = compile_stack(quant=True, custom=custom)

    assert result.matches[AR_PASS] == 5
    assert result.count(FUSED) == 5
    assert result.count(ALL_REDUCE) == 0
    assert result.count(RSQRT) == 0
    if custom:
        assert result.count(STATIC_QUANT, after=False) == 4
    # The 4 quantizing sites (all but the final norm) carry the scale: nothing quantizes apart.
    assert result.count(STATIC_QUANT) == 0
    assert result.count("aten.reciprocal.default") == 0
    args = fused_args(result)
    assert len(args) == 5, args
    assert sum(a[4] != "None" for a in args) == 4, args  # the scale
    assert sum(a[1] == "None" for a in args) == 1, args  # the residual: first site only


def test_tp1_fuses_nothing():
    assert_unfused(compile_stack(tp=1), pass_runs=False)


def test_float32_model_is_left_unfused():
    # The kernel takes 16-bit activations only.
    assert_unfused(compile_stack(dtype=torch.float32))


def test_hidden_not_a_multiple_of_8_is_left_unfused():
    # The kernel moves 16-byte vectors: hidden must be a multiple of 8.
    assert_unfused(compile_stack(hidden=204))


def test_flag_off_fuses_nothing():
    result = compile_stack(pass_config={"fuse_allreduce_rms": False})
    assert AR_PASS not in result.passes
    assert result.count(ALL_REDUCE) == 5


# sm90 TP2 (matrix): messages of 2 to 64 MiB; hidden 256 bf16 -> 4096 to 131072 tokens.
LOWER, UPPER = 2 * 2**20 // (256 * 2), 64 * 2**20 // (256 * 2)


def test_range_beyond_the_threshold_is_left_unfused():
    assert_unfused(compile_stack(compile_range=(UPPER + 1, 2 * UPPER)))


def test_range_below_the_lower_threshold_is_left_unfused():
    # vLLM's all-reduce + a separate norm measured faster for small messages.
    assert_unfused(compile_stack(compile_range=(1, LOWER - 1)))


def test_is_applicable_for_range_stops_at_the_thresholds():
    from vllm.config.utils import Range

    result = compile_stack()
    (ar_pass,) = [p for p in result.manager.passes if type(p).__name__ == "AllReduceFusionPass"]
    assert (ar_pass.min_tokens, ar_pass.max_tokens) == (LOWER, UPPER)
    assert ar_pass.is_applicable_for_range(Range(start=LOWER, end=UPPER))
    assert ar_pass.is_applicable_for_range(Range(start=UPPER, end=UPPER))
    assert not ar_pass.is_applicable_for_range(Range(start=LOWER, end=UPPER + 1))
    assert not ar_pass.is_applicable_for_range(Range(start=LOWER - 1, end=UPPER))


def test_user_limit_replaces_the_threshold():
    result = compile_stack(pass_config={"fuse_allreduce_rms": True,
                                        "fi_allreduce_fusion_max_size_mb": 1})
    (ar_pass,) = [p for p in result.manager.passes if type(p).__name__ == "AllReduceFusionPass"]
    assert ar_pass.max_tokens == 2**20 // (256 * 2)
    assert ar_pass.sizes.one_shot_bytes == 2**20
    # Below the measured lower bound: the whole user range is fused.
    assert ar_pass.min_tokens == 0


# ---------------------------------------------------------------- resolver and compile ranges

FLAG = "fuse_allreduce_rms"


def _decide(platform, tp, **kwargs):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    return resolve_fusion(FLAG, simulated_setup(platform, tp=tp, **kwargs))


@pytest.mark.parametrize("tp", [2, 4])
def test_resolver_turns_it_on_where_a_threshold_was_measured(tp):
    d = _decide("sm90", tp, level=2)
    assert d.enabled and d.status == "on", d
    assert d.implementation == "vllm_fusion" and d.route == "vllm_fusion", d
    assert not _decide("sm90", tp, level=1).enabled


@pytest.mark.parametrize("tp", [8])
def test_resolver_keeps_unmeasured_tp_off_unless_the_user_sets_a_limit(tp):
    d = _decide("sm90", tp, level=2)
    assert not d.enabled, d
    assert "fi_allreduce_fusion_max_size_mb" in d.reason and f"TP={tp}" in d.reason, d
    d = _decide("sm90", tp, level=2, allreduce_max_mib=4.0)
    assert d.enabled and d.route == "vllm_fusion", d


def test_resolver_keeps_tp1_off():
    d = _decide("sm90", 1, level=2)
    assert not d.enabled and "TP" in d.reason, d


@pytest.mark.parametrize("platform", ["gfx942", "gfx950"])
def test_rocm_keeps_vllms_aiter_route(platform):
    d = _decide(platform, 2, level=2, quant="fp8-group")
    assert d.enabled and d.route == "aiter", d
    # ROCm routes are not gated by the CUDA kernel's thresholds.
    assert _decide(platform, 8, level=2, quant="fp8-group").route == "aiter"


def test_compile_range_endpoints_are_the_thresholds():
    # sm90 TP2 bf16, hidden 8192 (16 KiB a token): fused from 2 MiB = 128 tokens (endpoint
    # 127) to 64 MiB = 4096 tokens.
    config = make_tp_config(optimization_level=2, hidden_size=8192)
    assert config.compilation_config.pass_config.fuse_allreduce_rms
    endpoints = config.compilation_config.compile_ranges_endpoints
    assert 127 in endpoints
    assert 4096 in endpoints or config.scheduler_config.max_num_batched_tokens <= 4096
    # The limit is put in place only while vLLM computes the ranges.
    assert config.compilation_config.pass_config.fi_allreduce_fusion_max_size_mb is None


def test_compile_range_endpoint_comes_from_the_hook():
    from vllm.config import VllmConfig

    wrapped = VllmConfig._set_compile_ranges
    try:
        VllmConfig._set_compile_ranges = wrapped.__wrapped__
        config = make_tp_config(optimization_level=2, hidden_size=8192)
    finally:
        VllmConfig._set_compile_ranges = wrapped
    assert 127 not in config.compilation_config.compile_ranges_endpoints


def test_allreduce_sizes():
    from vllm_fusion.passes.pass_manager_hook import allreduce_sizes

    sizes = allreduce_sizes(make_tp_config(optimization_level=2))
    assert (sizes.min_bytes, sizes.max_bytes) == (2 * 2**20, 64 * 2**20)
    tp4 = allreduce_sizes(make_tp_config(tp=4, optimization_level=2))
    assert (tp4.min_bytes, tp4.max_bytes, tp4.one_shot_bytes) == (8 * 2**20, 32 * 2**20, 0)
    assert "H200 x4" in tp4.measured
    assert allreduce_sizes(make_tp_config(tp=8, optimization_level=2, num_attention_heads=8,
                                          num_key_value_heads=8)) is None
    assert allreduce_sizes(make_tp_config(tp=1, optimization_level=2)) is None
    user = make_tp_config(pass_config={"fuse_allreduce_rms": True,
                                       "fi_allreduce_fusion_max_size_mb": 8})
    assert allreduce_sizes(user).max_bytes == 8 * 2**20


def test_push_limit_reaches_the_fused_op(monkeypatch):
    import dataclasses

    from vllm_fusion.matrix import load_matrix

    rows = load_matrix()[FLAG].message_sizes["sm90"]
    monkeypatch.setitem(rows, 2, dataclasses.replace(rows[2], push_bytes=2**20))
    result = compile_stack()
    assert result.matches[AR_PASS] == 5
    args = fused_args(result)
    # ..., group_name, max_bytes, one_shot_bytes, push_bytes
    assert len(args) == 5 and all(a[-3:] == [str(64 * 2**20)] * 2 + [str(2**20)] for a in args), \
        args


@pytest.mark.parametrize("row, message", [
    ({"max_mib": 64, "one_shot_mib": 8, "push_mib": 16}, "push_mib above one_shot_mib"),
    ({"min_mib": 4, "max_mib": 2, "one_shot_mib": 2}, "min_mib above max_mib"),
])
def test_bad_message_size_rows_are_rejected(row, message):
    from vllm_fusion.matrix import MatrixError, _message_sizes

    with pytest.raises(MatrixError, match=message):
        _message_sizes({"sm90": {"tp2": row}}, "fusions.fuse_allreduce_rms.message_sizes")


def test_push_limit_is_read_and_kept_under_the_one_shot_limit():
    from vllm_fusion.matrix import _message_sizes

    (sizes,) = _message_sizes({"sm90": {"tp2": {"max_mib": 64, "one_shot_mib": 8,
                                                "push_mib": 0.5}}}, "t")["sm90"].values()
    assert (sizes.one_shot_bytes, sizes.push_bytes) == (8 * 2**20, 2**19)
    (plain,) = _message_sizes({"sm90": {"tp2": {"max_mib": 64, "one_shot_mib": 8}}},
                              "t")["sm90"].values()
    assert plain.push_bytes == 0


# ---------------------------------------------------------------- the graph op's fake

@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_op_fake(with_scale, with_residual):
    import vllm_fusion.ops.fused_allreduce  # noqa: F401  (registers the op)
    from vllm_fusion.ops import fp8_dtype

    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.float16, device="cuda")
        residual = torch.empty_like(x) if with_residual else None
        weight = torch.empty(256, dtype=torch.float16, device="cuda")
        scale = torch.ones(1, device="cuda") if with_scale else None
        out, residual_out = torch.ops.vllm_fusion.fused_all_reduce_rms_norm(
            x, residual, weight, 1e-6, scale, GROUP, 8 * 2**20, 2**20)
    assert out.shape == residual_out.shape == (5, 256)
    assert out.dtype == (fp8_dtype(x.device) if with_scale else torch.float16)
    assert residual_out.dtype == torch.float16


# ---------------------------------------------------------------- the graph op's routing


class _RecordingOps:
    """Stand-in for torch.ops.vllm_fusion that records which kernel the graph op calls."""

    def __init__(self):
        self.calls = []

    def all_reduce_rms_norm(self, x, residual, weight, eps, scale, buffers, counter, rank,
                            capacity, two_shot, push):
        self.calls.append(("fused", "two-shot" if two_shot else "push" if push else "one-shot"))
        return x, x

    def __getattr__(self, name):
        def unfused_norm(x, *args):
            self.calls.append(("norm", name))
            return (x, x) if name.startswith("fused_add") else x
        return unfused_norm


@pytest.fixture
def graph_op(monkeypatch):
    """The graph op's impl with a stand-in group, workspace, all-reduce and kernels."""
    from types import SimpleNamespace

    import vllm_fusion.ops.fused_allreduce as fa
    from vllm_fusion.ops.allreduce_workspace import AllReduceWorkspace

    ops = _RecordingOps()
    state = SimpleNamespace(workspace=AllReduceWorkspace(
        buffer=None, handle=None, buffers=[16, 32], counter=torch.zeros(2, dtype=torch.int64),
        rank=0, world_size=2, capacity=64 * 1024), ops=ops)
    group = SimpleNamespace(unique_name="tp:0", device_group=None, cpu_group=None)
    monkeypatch.setattr(fa, "_OPS", ops)
    monkeypatch.setattr(fa, "_group", lambda name: group)
    monkeypatch.setattr(fa.allreduce_workspace, "get_workspace",
                        lambda *args, **kwargs: state.workspace)

    def vllm_all_reduce(x, group_name):
        ops.calls.append(("vllm.all_reduce", group_name))
        return x

    monkeypatch.setattr(fa, "_vllm_all_reduce", vllm_all_reduce)

    def call(tokens, residual=True, scale=None, one_shot_bytes=16 * 1024, push_bytes=0):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        r = torch.randn_like(x) if residual else None
        w = torch.randn(256, dtype=torch.bfloat16)
        ops.calls.clear()
        fa.fused_all_reduce_rms_norm_impl(x, r, w, 1e-6, scale, "tp:0", 64 * 1024,
                                          one_shot_bytes, push_bytes)
        return list(ops.calls)

    state.call = call
    return state


def test_graph_op_takes_one_shot_up_to_its_limit_then_two_shot(graph_op):
    # 256 bf16 = 512 bytes a token; one-shot up to 16 KiB = 32 tokens.
    assert graph_op.call(32) == [("fused", "one-shot")]
    assert graph_op.call(33) == [("fused", "two-shot")]


def test_graph_op_pushes_up_to_its_limit_where_every_rank_has_a_slot(graph_op):
    # push up to 8 KiB = 16 tokens; one-shot up to 48 KiB; the 64 KiB workspace holds two
    # 32 KiB slots (64 tokens), so push_bytes beyond that still runs the plain one-shot.
    assert graph_op.call(16, push_bytes=8 * 1024) == [("fused", "push")]
    assert graph_op.call(17, push_bytes=8 * 1024) == [("fused", "one-shot")]
    assert graph_op.call(1) == [("fused", "one-shot")]  # push_bytes 0: never
    big = {"one_shot_bytes": 48 * 1024, "push_bytes": 48 * 1024}
    assert graph_op.call(64, **big) == [("fused", "push")]
    assert graph_op.call(65, **big) == [("fused", "one-shot")]
    assert graph_op.call(97, **big) == [("fused", "two-shot")]


def test_graph_op_runs_unfused_beyond_the_workspace(graph_op):
    # 64 KiB workspace = 128 tokens.
    assert graph_op.call(128) == [("fused", "two-shot")]
    assert graph_op.call(129) == [("vllm.all_reduce", "tp:0"), ("norm", "fused_add_rms_norm_pad")]
    assert graph_op.call(129, residual=False) == [("vllm.all_reduce", "tp:0"),
                                                   ("norm", "rms_norm_pad")]
    scale = torch.ones(1)
    assert graph_op.call(129, scale=scale) == [
        ("vllm.all_reduce", "tp:0"), ("norm", "fused_add_rms_norm_static_fp8_quant")]
    assert graph_op.call(129, residual=False, scale=scale) == [
        ("vllm.all_reduce", "tp:0"), ("norm", "rms_norm_static_fp8_quant")]


def test_graph_op_runs_unfused_without_a_workspace(graph_op):
    graph_op.workspace = None
    assert graph_op.call(1) == [("vllm.all_reduce", "tp:0"), ("norm", "fused_add_rms_norm_pad")]
