"""enable_sp on a simulated TP2 decoder stack built from vLLM 0.26's layers: every all-reduce +
RMSNorm site (with or without residual, with or without static FP8 quant, the final norm too)
becomes reduce-scatter + the norm on this rank's shard + all-gather, the temporary residual
slices are gone, and nothing changes below the token threshold, at TP1 or when the flag is off."""

from __future__ import annotations

import re

import pytest
import torch

from tests.cpu.compile_harness import run_post_grad_passes
from tests.cpu.models import GROUP, AllReduceDecoderStack, make_tp_config, simulate_gpus
from vllm_fusion import compat

# The pass runs on vLLM 0.26 only: 0.33 has neither the flags nor the runner's SP padding.
on_vllm_026 = pytest.mark.skipif(compat.release() is not compat.VLLM_0_26,
                                 reason="enable_sp compiles on vLLM 0.26 only")

SP_PASS = "vllm_fusion:SequenceParallelismPass"
VLLM_SP_PASS = "vllm:SequenceParallelismPass"
ALL_REDUCE = "vllm.all_reduce.default"
REDUCE_SCATTER = "vllm.reduce_scatter.default"
ALL_GATHER = "vllm.all_gather.default"
RMS_NORM = "vllm_ir.rms_norm.default"
ADD_RMS_NORM = "vllm_ir.fused_add_rms_norm.default"
STATIC_QUANT = "_C.static_scaled_fp8_quant.default"
SLICE = "aten.slice.Tensor"
# What vLLM's IR lowering (after the passes) turns each norm into.
RSQRT = "aten.rsqrt.default"
MIN_TOKENS = 64


@pytest.fixture(autouse=True)
def hooked(pass_hook, monkeypatch):
    from vllm_fusion.passes import sequence_parallelism

    simulate_gpus(8)
    monkeypatch.setattr(sequence_parallelism, "tp_group_name", lambda: GROUP)
    # Rank 1: the residual slices start at an offset, as on every rank but the first.
    monkeypatch.setattr(sequence_parallelism, "tp_rank", lambda: 1)


def sp_config(*, tp=2, custom=True, dtype=torch.bfloat16, hidden=256, pass_config=None):
    pass_config = {"enable_sp": True, "sp_min_token_num": MIN_TOKENS, "fuse_allreduce_rms": False} \
        if pass_config is None else pass_config
    return make_tp_config(tp=tp, dtype=dtype, hidden_size=hidden, pass_config=pass_config,
                          custom_ops=["+quant_fp8" if custom else "-quant_fp8"])


def compile_stack(*, quant=False, eps=1e-6, num_layers=2, compile_range=(4096, 8192),
                  dtype=torch.bfloat16, column_gemm=False, **config_args):
    config = sp_config(dtype=dtype, **config_args)
    hidden = config.model_config.get_hidden_size()
    return run_post_grad_passes(
        lambda: AllReduceDecoderStack(hidden, dtype, eps, quant, num_layers, column_gemm),
        lambda: [torch.empty(8, hidden, dtype=dtype)],
        config, compile_range=compile_range)


def collective_args(result, op: str) -> list[str]:
    marker = f"{op}](args = ("
    return [line.split(marker, 1)[1].split(")")[0] for line in result.graph_after.splitlines()
            if marker in line]


def gathered_sources(result) -> list[str]:
    """For each all-gather, the graph line defining its input (through a getitem)."""
    lines = result.graph_after.splitlines()
    defining = {m.group(1): line for line in lines
                if (m := re.match(r"\s*%(\w+) : ", line))}
    sources = []
    for args in collective_args(result, ALL_GATHER):
        line = defining[args.split(",")[0].lstrip("%")]
        if "operator.getitem" in line:
            line = defining[re.search(r"args = \(%(\w+)", line).group(1)]
        sources.append(line)
    return sources


def assert_split(result, num_layers=2):
    sites = 1 + 2 * num_layers
    assert result.count(ALL_REDUCE, after=False) == sites
    assert result.matches[SP_PASS] == sites
    assert result.count(ALL_REDUCE) == 0
    assert result.count(REDUCE_SCATTER) == sites and result.count(ALL_GATHER) == sites
    # The same norms (one plain after the embedding, the rest fused-add), now on the shard.
    assert result.count(RMS_NORM, after=False) == 1
    assert result.count(ADD_RMS_NORM, after=False) == sites - 1
    assert result.count(RSQRT) == sites
    for op in (REDUCE_SCATTER, ALL_GATHER):
        for args in collective_args(result, op):
            assert args.endswith(f", 0, 2, {GROUP}"), args  # dim 0, TP 2, the TP group
    # Every residual slice became a no-op once the site before was replaced, and is gone.
    assert result.count(SLICE) == 0


@on_vllm_026
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_every_site_is_split(num_layers):
    result = compile_stack(num_layers=num_layers)
    assert SP_PASS in result.passes and VLLM_SP_PASS not in result.passes
    assert_split(result, num_layers)


@on_vllm_026
@pytest.mark.parametrize("custom, eps, dtype", [
    (True, 1e-6, torch.bfloat16),
    (False, 1e-5, torch.float16),
], ids=["custom-quant-bf16", "native-quant-fp16"])
def test_static_fp8_quant_runs_on_the_shard(custom, eps, dtype):
    result = compile_stack(quant=True, custom=custom, eps=eps, dtype=dtype)
    assert_split(result)
    if custom:
        # 4 quant sites (every norm but the last) plus the GEMM inputs' own quant; none is lost.
        assert result.count(STATIC_QUANT) == result.count(STATIC_QUANT, after=False)
    # Each quantized site gathers the FP8 values of its shard (the final norm is not quantized).
    sources = gathered_sources(result)
    fp8 = [src for src in sources if ("auto_functionalized" in src if custom else
                                      "torch.float8_e4m3fn" in src)]
    assert len(fp8) == 4 and len(sources) == 5, "\n".join(sources)


@on_vllm_026
def test_below_the_threshold_nothing_changes():
    result = compile_stack(compile_range=(1, MIN_TOKENS - 1))
    assert result.matches.get(SP_PASS, 0) == 0
    assert result.count(ALL_REDUCE) == 5 and result.count(REDUCE_SCATTER) == 0


@on_vllm_026
def test_vllm_adds_the_threshold_to_the_compile_ranges():
    config = sp_config()
    ranges = config.compilation_config.get_compile_ranges()
    assert any(r.end == MIN_TOKENS - 1 for r in ranges), ranges


@on_vllm_026
def test_flag_off_leaves_the_all_reduces():
    result = compile_stack(pass_config={"fuse_allreduce_rms": False})
    assert SP_PASS not in result.passes
    assert result.count(ALL_REDUCE) == 5 and result.count(REDUCE_SCATTER) == 0


@on_vllm_026
def test_the_flag_keeps_the_forward_in_one_graph():
    compilation = sp_config().compilation_config
    assert compilation.splitting_ops == []


# ---------------------------------------------------------------- where SP starts

@on_vllm_026
@pytest.mark.parametrize("platform, hidden, tp, expected", [
    ("sm90", 8192, 2, 8 * 2**20 * 2 // (8192 * 2)),  # 1024 tokens
    ("sm90", 8192, 4, 8 * 2**20 * 4 // (8192 * 2)),
    ("sm100", 8192, 2, 32 * 2**20 * 2 // (8192 * 2)),
    ("sm90", 4096, 2, None),  # below the minimum hidden size
    ("sm89", 8192, 2, None),  # no threshold for the platform
])
def test_threshold_from_the_matrix(platform, hidden, tp, expected):
    from vllm_fusion.passes.sequence_parallelism import sp_min_token_num

    config = sp_config(hidden=hidden, pass_config={})
    config.parallel_config.tensor_parallel_size = tp
    assert sp_min_token_num(config, platform) == expected


@on_vllm_026
def test_explicit_threshold_wins():
    from vllm_fusion.passes.sequence_parallelism import sp_min_token_num

    assert sp_min_token_num(sp_config(hidden=4096), "sm89") == MIN_TOKENS


@on_vllm_026
def test_turning_sp_on_warns_what_decode_measured(vllm_logs):
    from vllm_fusion.matrix import load_matrix

    compile_stack()
    cost = load_matrix()["enable_sp"].sp_thresholds["sm90"].decode_cost
    assert "model runner for V1" in cost
    assert f"for it applies to every batch; measured on sm90: {cost}" in vllm_logs.text


@on_vllm_026
def test_no_decode_warning_where_nothing_was_measured(vllm_logs, monkeypatch):
    import dataclasses

    from vllm_fusion.matrix import load_matrix

    rows = load_matrix()["enable_sp"].sp_thresholds
    monkeypatch.setitem(rows, "sm90", dataclasses.replace(rows["sm90"], decode_cost=""))
    result = compile_stack()
    assert result.matches[SP_PASS] == 5
    assert "applies to every batch" not in vllm_logs.text


@pytest.mark.parametrize("row, message", [
    ({"per_gpu_mib": 8}, "min_hidden and per_gpu_mib (numbers) are required"),
    ({"min_hidden": 8192, "per_gpu_mib": 0}, "per_gpu_mib > 0"),
    ({"min_hidden": 8192, "per_gpu_mib": 8, "decode_cost": 1.9},
     "decode_cost: a string (the measurement), got 1.9"),
])
def test_bad_threshold_rows_are_rejected(row, message):
    from vllm_fusion.matrix import MatrixError, _sp_thresholds

    with pytest.raises(MatrixError, match=re.escape(message)):
        _sp_thresholds({"sm90": row}, "fusions.enable_sp.sp_thresholds", {"sm90": object()})


@pytest.mark.parametrize("platform, tp, quant, status, implementation", [
    ("sm90", 2, "unquantized", "on", "vllm_fusion"),
    ("sm90", 2, "fp8-static", "on", "vllm_fusion"),
    # NVFP4 patterns are vLLM's: its pass keeps SP for NVFP4 models.
    ("sm100", 2, "nvfp4", "on", "vllm"),
    ("sm90", 1, "unquantized", "off", "vllm_fusion"),
])
def test_explicit_flag_resolution(platform, tp, quant, status, implementation):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    d = resolve_fusion("enable_sp", simulated_setup(platform, tp=tp, quant=quant, level=2,
                                                    flags={"enable_sp": True}, vllm="0.26.0"))
    assert d.status == status and d.implementation == implementation, d


def test_off_on_vllm_033_with_the_reason():
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    for flag in ("enable_sp", "fuse_gemm_comms"):
        d = resolve_fusion(flag, simulated_setup("sm90", tp=2, flags={flag: True},
                                                 vllm="0.33.0"))
        assert not d.enabled
        assert "token counts padded to a multiple of TP" in d.warning, d


@pytest.mark.parametrize("level", [1, 2, 3])
def test_off_by_default(level):
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    assert not resolve_fusion("enable_sp", simulated_setup("sm90", tp=2, level=level)).enabled


# ---------------------------------------------------------------- with fuse_gemm_comms

def fake_tp_group(monkeypatch):
    """What vLLM's AsyncTPPass asks of the TP group, on a CPU: a fake 2-rank process group
    registered under the group's name (the symmetric-memory ops resolve it for their shapes)."""
    import types

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from vllm.compilation.passes.fusion import collective_fusion

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    torch._C._distributed_c10d._register_process_group(GROUP, dist.group.WORLD)

    group = types.SimpleNamespace(unique_name=GROUP,
                                  device_group=types.SimpleNamespace(group_name=GROUP))
    monkeypatch.setattr(collective_fusion, "get_tp_group", lambda: group)
    monkeypatch.setattr(collective_fusion, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(collective_fusion, "enable_symm_mem_for_group", lambda name: None)


@on_vllm_026
def test_vllms_async_tp_runs_right_after_and_fuses_the_gemms(monkeypatch):
    """vLLM builds its AsyncTPPass only beside its own SP pass: the package puts it back right
    after its own, and it fuses every GEMM next to a reduce-scatter or all-gather."""
    fake_tp_group(monkeypatch)
    result = compile_stack(column_gemm=True,
                           pass_config={"enable_sp": True, "fuse_gemm_comms": True,
                                        "sp_min_token_num": MIN_TOKENS,
                                        "fuse_allreduce_rms": False})
    assert result.passes.index("vllm:AsyncTPPass") == result.passes.index(SP_PASS) + 1
    assert result.matches[SP_PASS] == 5
    # 4 column-parallel GEMMs on all-gathered inputs, 4 row-parallel ones reduce-scattered.
    assert result.count("symm_mem.fused_all_gather_matmul.default") == 4
    assert result.count("symm_mem.fused_matmul_reduce_scatter.default") == 4
    assert result.count("aten.mm.default") == 0
    assert result.count(ALL_GATHER) == 1  # the final norm's, which no GEMM reads here
    assert result.count(REDUCE_SCATTER) == 1  # the embedding's
