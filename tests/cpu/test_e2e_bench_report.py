"""The end-to-end benchmark suite (benchmarks/e2e) without a GPU: planned commands and
environments, statistics and speedups on recorded `vllm bench` JSON, report.md, results.json.

Fixtures have the shape `vllm bench latency --output-json` writes (percentile keys become
strings in JSON). Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import sys
import time

import pytest

from tests.cpu.scripts import ROOT, load_script

E2E = ROOT / "benchmarks" / "e2e"

run_mod = load_script("vllm_fusion_e2e_run", "benchmarks/e2e/run.py")
plan = run_mod.plan
report = run_mod.report

SETTINGS = plan.Settings(load_format="dummy", model_root="/opt/devpack/models")


def latency_json(latencies: list[float]) -> dict:
    """What vllm bench latency writes: avg, the raw list, numpy-style percentiles (str keys)."""
    s = sorted(latencies)

    def pct(p):
        pos = (len(s) - 1) * p / 100
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"avg_latency": sum(latencies) / len(latencies), "latencies": latencies,
            "percentiles": {str(p): pct(p) for p in (10, 25, 50, 75, 90, 99)}}


# H100 numbers of the devkit reference (llama3-8b-fp8, bs 1, in 32, out 128, 8 iterations).
BASE_BS1 = latency_json([0.5431, 0.5447, 0.5439, 0.5452, 0.5436, 0.5449, 0.5441, 0.5441])
FUSIONS_BS1 = latency_json([0.5801, 0.5812, 0.5806, 0.5810, 0.5803, 0.5809, 0.5807, 0.5816])
PLUGIN_BS1 = latency_json([0.5201, 0.5213, 0.5198, 0.5220, 0.5207, 0.5205, 0.5211, 0.5209])
BASE_BS64 = latency_json([0.7012, 0.7040, 0.7025, 0.7031, 0.7019, 0.7036, 0.7028, 0.7021])
PLUGIN_BS64 = latency_json([0.6710, 0.6722, 0.6715, 0.6731, 0.6718, 0.6709, 0.6725, 0.6720])
THROUGHPUT_BASE = {"elapsed_time": 8.0, "num_requests": 256, "total_num_tokens": 40960,
                   "requests_per_second": 32.0, "tokens_per_second": 5120.0}
THROUGHPUT_PLUGIN = {"elapsed_time": 7.5, "num_requests": 256, "total_num_tokens": 40960,
                     "requests_per_second": 34.13, "tokens_per_second": 5461.33}
FAILED_TAIL = ("  File \"vllm/v1/worker/gpu_model_runner.py\", line 4182, in capture_model\n"
               "RuntimeError: CUDA error: an illegal memory access was encountered")


# As a full suite plans them: identical configurations merged (plugin-only-fuse_act_quant is
# also plugin-without-fuse_norm_quant).
CONFIGS = {c.name: c for c in plan.resolve_configs(plan.builtin_names())}


def make_run(config: str, bs: int | None = 1, bench: str = "latency", model="llama3-8b-fp8",
             settings=SETTINGS):
    return plan.Run(bench, model, bs, 1, CONFIGS[config], settings)


def record(config: str, result: dict | None, bs: int | None = 1, bench: str = "latency",
           status: str = "ok", invocation: str = "inv-1", **extra) -> dict:
    r = make_run(config, bs, bench)
    cmd = plan.build_command(r, f"/out/runs/{r.id}.json")
    return {**r.describe(), "command": cmd, "shell": plan.shell_line(r, cmd), "status": status,
            "result": result, "invocation": invocation, **extra}


def suite_records() -> list[dict]:
    return [
        record("vllm-O2", BASE_BS1),
        record("vllm-fusions", FUSIONS_BS1),
        record("plugin-O2", PLUGIN_BS1),
        record("plugin-only-fuse_act_quant", None, status="failed", returncode=1,
               error="exit status 1", log="runs/x.log", log_tail=FAILED_TAIL),
        record("vllm-O2", BASE_BS64, bs=64),
        record("plugin-O2", PLUGIN_BS64, bs=64),
        record("vllm-O2", THROUGHPUT_BASE, bs=None, bench="throughput"),
        record("plugin-O2", THROUGHPUT_PLUGIN, bs=None, bench="throughput"),
    ]


COMMAND = ("python benchmarks/e2e/run.py --models llama3-8b-fp8 --batch-sizes 1 64 "
           "--model-root /opt/devpack/models --load-format dummy --bench latency throughput")
ENVIRONMENT = {"date": "2026-11-27T13:00:00+00:00", "host": "gpu-1",
               "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory": "81559 MiB"}],
               "driver": "580.95.05", "cuda": "13.0", "vllm": "0.26.0", "torch": "2.11.0+cu130",
               "vllm_fusion": "0.1.0", "git_head": "c9fc8af809d1baf40bc7a2d767f9de39fab4c735"}


def document(records=None) -> dict:
    records = suite_records() if records is None else records
    configs = plan.resolve_configs(["vllm-O2", "vllm-fusions", "plugin-O2",
                                    "plugin-only-fuse_act_quant"])
    return report.build_document(records, command=COMMAND, environment=ENVIRONMENT,
                                 invocation="inv-1", settings={"iters": 8, "warmup": 3},
                                 configs=[run_mod.config_dict(c) for c in configs])


def pass_config(args) -> dict:
    args = list(args)
    return json.loads(args[args.index("--compilation-config") + 1])["pass_config"]


# ---------------------------------------------------------------- planning

def test_baseline_is_plain_vllm_at_O2_with_the_compile_cache_off():
    r = make_run("vllm-O2")
    env = plan.build_env(r, {"PATH": "/usr/bin", "VLLM_PLUGINS": "something"})
    assert env["VLLM_PLUGINS"] == ""
    assert env["VLLM_DISABLE_COMPILE_CACHE"] == "1"
    assert env["PATH"] == "/usr/bin"
    cmd = plan.build_command(r, "/out/a.json", python="python")
    assert cmd[:6] == ["python", "-m", "vllm.entrypoints.cli.main", "bench", "latency", "--model"]
    assert cmd[6] == "/opt/devpack/models/llama3-8b-fp8"
    assert cmd[-1] == "-O2" and "--compilation-config" not in cmd
    for flag, value in (("--load-format", "dummy"), ("--batch-size", "1"), ("--input-len", "32"),
                        ("--output-len", "128"), ("--num-iters", "8"),
                        ("--num-iters-warmup", "3"), ("--tensor-parallel-size", "1"),
                        ("--output-json", "/out/a.json")):
        assert cmd[cmd.index(flag) + 1] == value
    assert plan.shell_line(r, cmd).startswith("VLLM_DISABLE_COMPILE_CACHE=1 ")
    assert "VLLM_PLUGINS=''" in plan.shell_line(r, cmd)


def test_vllm_fusions_turns_on_vllms_custom_ops_and_both_fusions():
    c = plan.builtin_config("vllm-fusions")
    assert c.env == {"VLLM_PLUGINS": ""}
    assert c.args[0] == "-O2"
    cc = json.loads(c.args[c.args.index("--compilation-config") + 1])
    assert cc == {"custom_ops": ["+rms_norm", "+quant_fp8", "+silu_and_mul"],
                  "pass_config": {"fuse_norm_quant": True, "fuse_act_quant": True}}


def test_plugin_configs_unset_vllm_plugins():
    r = make_run("plugin-O2")
    env = plan.build_env(r, {"VLLM_PLUGINS": "", "HOME": "/root"})
    assert "VLLM_PLUGINS" not in env and env["VLLM_DISABLE_COMPILE_CACHE"] == "1"
    assert r.config.args == ("-O2",)
    line = plan.shell_line(r, plan.build_command(r, "/o.json"))
    assert line.startswith("env -u VLLM_PLUGINS ")
    # the shell line is a runnable command: the JSON argument survives the quoting
    only = make_run("plugin-only-fuse_norm_quant")
    argv = shlex.split(plan.shell_line(only, plan.build_command(only, "/o.json")))
    assert argv[:3] == ["env", "-u", "VLLM_PLUGINS"]
    assert pass_config(argv) == {"fuse_norm_quant": True, "fuse_act_quant": False}


@pytest.mark.parametrize("flag", plan.DEFAULT_FLAGS)
def test_plugin_only_and_without_toggle_exactly_one_flag(flag):
    only = plan.builtin_config(f"plugin-only-{flag}")
    without = plan.builtin_config(f"plugin-without-{flag}")
    assert only.env == without.env == {"VLLM_PLUGINS": None}
    assert only.args[0] == without.args[0] == "-O2"
    assert pass_config(only.args) == {f: f == flag for f in plan.DEFAULT_FLAGS}
    assert pass_config(without.args) == {f: f != flag for f in plan.DEFAULT_FLAGS}


def test_plugin_only_with_a_longer_flag_list_and_an_extra_flag():
    flags = ["fuse_norm_quant", "fuse_act_quant", "fuse_attn_quant"]
    enabled = pass_config(plan.builtin_config("plugin-only-fuse_act_quant", flags).args)
    assert [f for f, on in enabled.items() if on] == ["fuse_act_quant"] and len(enabled) == 3
    extra = pass_config(plan.builtin_config("plugin-without-fuse_allreduce_rms").args)
    assert extra == {"fuse_norm_quant": True, "fuse_act_quant": True, "fuse_allreduce_rms": False}


def test_identical_configurations_run_once_under_both_names():
    configs = plan.resolve_configs(plan.builtin_names())
    assert [c.name for c in configs] == [
        "vllm-O2", "vllm-fusions", "plugin-O2",
        "plugin-only-fuse_norm_quant", "plugin-only-fuse_act_quant"]
    assert configs[3].aliases == ("plugin-without-fuse_act_quant",)
    assert configs[4].aliases == ("plugin-without-fuse_norm_quant",)
    with pytest.raises(ValueError, match="unknown configuration"):
        plan.resolve_configs(["vllm-O3"])


def test_matrix_order_and_size():
    configs = plan.resolve_configs(["plugin-O2", "vllm-O2"])
    runs = plan.expand_runs(["llama3-8b-fp8", "qwen3-8b"], [1, 64], [1], configs, SETTINGS,
                            ["throughput", "latency"])
    latency = [r for r in runs if r.bench == "latency"]
    assert len(latency) == 8 and len(runs) == 12
    # baseline first in every comparison, comparisons contiguous, latency before throughput
    assert [r.config.name for r in runs[:2]] == ["vllm-O2", "plugin-O2"]
    assert [r.batch_size for r in latency[::2]] == [1, 64, 1, 64]
    assert runs[-1].bench == "throughput" and runs[-1].batch_size is None
    assert "--num-prompts" in plan.build_command(runs[-1], "/o.json")
    assert len({r.id for r in runs}) == len(runs)
    assert len({r.fingerprint() for r in runs}) == len(runs)


def test_repeats_alternate_the_order_of_each_round():
    configs = plan.resolve_configs(["plugin-O2", "vllm-O2"])
    runs = plan.expand_runs(["llama3-8b-fp8"], [64], [1], configs, SETTINGS, repeats=4)
    assert [(r.repeat, r.config.name) for r in runs] == [
        (1, "vllm-O2"), (1, "plugin-O2"), (2, "plugin-O2"), (2, "vllm-O2"),
        (3, "vllm-O2"), (3, "plugin-O2"), (4, "plugin-O2"), (4, "vllm-O2")]
    # every round is its own comparison, run and resumed as one
    assert len({r.group for r in runs}) == 4
    assert runs[0].id == "latency__llama3-8b-fp8__bs64__tp1__vllm-O2"
    assert runs[2].id == "latency__llama3-8b-fp8__bs64__tp1__plugin-O2__r2"
    assert len({r.fingerprint() for r in runs}) == len(runs) == len({r.id for r in runs})
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        plan.expand_runs(["m"], [1], [1], configs, SETTINGS, repeats=0)


def test_every_run_skips_vllms_compile_cache_but_keeps_inductors():
    env = plan.env_changes(make_run("plugin-O2"))
    assert env["VLLM_DISABLE_COMPILE_CACHE"] == "1"
    assert "TORCHINDUCTOR_FORCE_DISABLE_CACHES" not in env


def rounds_records() -> list[dict]:
    configs = plan.resolve_configs(["plugin-O2", "vllm-O2"])
    runs = plan.expand_runs(["llama3-8b-fp8"], [64], [1], configs, SETTINGS, repeats=2)
    # round 1: plugin 2% slower; round 2: plugin 1% faster (process-to-process spread)
    lat = {(1, "vllm-O2"): 0.70, (1, "plugin-O2"): 0.714, (2, "plugin-O2"): 0.693,
           (2, "vllm-O2"): 0.70}
    return [{**r.describe(), "status": "ok", "invocation": "inv-1",
             "result": latency_json([lat[(r.repeat, r.config.name)]] * 3)} for r in runs]


def test_rounds_are_paired_within_the_round_and_summarised_over_processes():
    records = rounds_records()
    ups = report.speedups(records)
    assert ups["latency__llama3-8b-fp8__bs64__tp1__plugin-O2"]["speedup"] == pytest.approx(
        0.70 / 0.714)
    assert ups["latency__llama3-8b-fp8__bs64__tp1__plugin-O2__r2"]["speedup"] == pytest.approx(
        0.70 / 0.693)
    summary = {e["config"]: e for e in report.round_summary(report.summary_rows(records))}
    assert summary["plugin-O2"]["avgs"] == pytest.approx([0.714, 0.693])
    assert summary["plugin-O2"]["speedup"] == pytest.approx(0.70 / ((0.714 + 0.693) / 2))
    assert summary["vllm-O2"]["speedup"] is None and summary["vllm-O2"]["is_baseline"]
    md = report.render_markdown(document(records), chart=None)
    assert "### Over rounds" in md
    assert "| llama3-8b-fp8 | 64 | 1 | plugin-O2 | 2 | 0.7140 0.6930 | 0.7035 | 0.995x | " \
           "0.980x-1.010x |" in md
    assert "0.995x (2 processes)" in md  # the pivot uses the mean over rounds
    assert "| llama3-8b-fp8 | 64 | 1 | 2 | plugin-O2 |" in md  # the round column
    groups, _ = report.chart_data(report.summary_rows(records))
    assert groups["llama3-8b-fp8\nbs=64"]["plugin-O2"][0] == pytest.approx(0.7035)
    assert groups["llama3-8b-fp8\nbs=64"]["plugin-O2"][3] == 2
    single = report.render_markdown(document(), chart=None)
    assert "Over rounds" not in single and "| round |" not in single


def test_reused_invocation_with_the_same_setup_is_one_line():
    doc = document()
    doc["environments"]["inv-0"] = {**ENVIRONMENT, "date": "2026-11-27T12:00:00+00:00"}
    doc["environments"]["inv-9"] = {**ENVIRONMENT, "git_head": "0" * 40}
    md = report.render_markdown(doc, chart=None)
    assert ("Results reused from invocation `inv-0` (2026-11-27T12:00:00+00:00): same card, "
            "software and commit as above.") in md
    assert "Results reused from invocation `inv-9`:" in md and "0" * 40 in md


def test_real_checkpoints_without_a_model_root():
    real = plan.Settings(load_format="auto", model_root="")
    r = plan.Run("latency", "meta-llama/Llama-3.1-8B-Instruct", 8, 2,
                 plan.builtin_config("vllm-O2"), real)
    cmd = plan.build_command(r, "/o.json")
    assert cmd[cmd.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert cmd[cmd.index("--load-format") + 1] == "auto"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "/" not in r.id
    assert plan.resolve_model("/ckpt/llama", "/opt/devpack/models") == "/ckpt/llama"


def test_plan_files_and_command_line_precedence(tmp_path, capsys):
    toml = tmp_path / "plan.toml"
    toml.write_text('models = ["llama3-8b-fp8", "qwen3-8b"]\nbatch-sizes = [1, 64]\ntp = 1\n'
                    'configs = ["vllm-O2", "plugin-O2", "mine"]\niters = 5\n'
                    'model_root = "/opt/devpack/models"\n'
                    '[custom_configs.mine]\nenv = {VLLM_LOGGING_LEVEL = "DEBUG"}\n'
                    'unset_env = ["VLLM_PLUGINS"]\nargs = "-O3"\n')
    args = run_mod.parse_args(["--plan", str(toml), "--iters", "9", "--models", "qwen3-8b"])
    opts = run_mod.merged_options(args)
    assert opts["models"] == ["qwen3-8b"] and opts["iters"] == 9 and opts["batch_sizes"] == [1, 64]
    assert opts["tp"] == [1] and opts["load_format"] == "dummy"
    mine = plan.resolve_configs(opts["configs"], custom=opts["custom_configs"])[-1]
    assert mine.env == {"VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_PLUGINS": None}
    assert mine.args == ("-O3",)
    as_json = plan.parse_plan(json.dumps({"models": "qwen3-8b", "batch_sizes": 64}), ".json")
    assert as_json == {"models": ["qwen3-8b"], "batch_sizes": [64]}
    with pytest.raises(ValueError, match="unknown plan keys"):
        plan.parse_plan('{"model": "x"}', ".json")

    assert run_mod.main(["--plan", str(toml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("vllm.entrypoints.cli.main bench latency") == 12  # 2 models x 2 bs x 3
    assert "VLLM_LOGGING_LEVEL=DEBUG" in out and "--num-iters 5" in out


@pytest.mark.parametrize("name, runs, expect", [
    ("sp-prefill.toml", 3, ["--input-len 2048", "-cc.pass_config.fuse_gemm_comms=True",
                            "VLLM_PLUGINS='' ", "-cc.pass_config.fuse_allreduce_rms=False"]),
    ("sp-decode-cost.toml", 5, ["VLLM_USE_V2_MODEL_RUNNER=0", "'-cc.splitting_ops=[]'",
                                "-cc.cudagraph_mode=FULL",
                                "-cc.use_inductor_graph_partition=True"]),
])
def test_shipped_plans_plan_what_their_reports_ran(name, runs, expect, capsys):
    path = E2E / "plans" / name
    assert run_mod.main(["--plan", str(path), "--tp", "4", "--dry-run",
                         "--model-root", "/opt/devpack/models"]) == 0
    out = capsys.readouterr().out
    assert out.count("bench latency --model /opt/devpack/models/llama3-70b-8l ") == runs
    assert out.count("--tensor-parallel-size 4") == runs and out.count("--max-num-seqs 8") == runs
    for text in expect:
        assert text in out, text


def test_the_all_reduce_plan_compares_with_vllms_fusion_off(capsys):
    path = E2E / "plans" / "ar-decode.toml"
    assert run_mod.main(["--plan", str(path), "--tp", "2", "--dry-run",
                         "--model-root", "/opt/devpack/models"]) == 0
    out = capsys.readouterr().out
    assert out.count("bench latency --model /opt/devpack/models/llama3-8b-fp8 ") == 2
    baseline, plugin = [line for line in out.splitlines() if "bench latency" in line]
    assert "VLLM_PLUGINS=''" in baseline and "fuse_allreduce_rms=False" in baseline
    assert plugin.startswith("env -u VLLM_PLUGINS") and "fuse_allreduce_rms" not in plugin
    assert "--batch-size 1 " in plugin and "--tensor-parallel-size 2" in plugin


def _git_answers(monkeypatch, head: str | None, status: str = ""):
    def output(cmd, timeout):
        return head if "rev-parse" in cmd else status
    monkeypatch.setattr(run_mod, "_output", output)


def test_git_head_given_wins_over_a_stale_git_in_a_copied_tree(monkeypatch):
    _git_answers(monkeypatch, "18a55f0974ab3e5c2ae9df996f1427419894290c\n", " M a\n M b\n")
    info = run_mod.git_info("24542aa")
    assert info["git_head"] == "24542aa" and "git_dirty" not in info
    stale = info["git_tree_head"]
    assert stale.startswith("18a55f0974ab") and "not what ran" in stale
    _git_answers(monkeypatch, "24542aa0000000000000000000000000000000000\n")
    assert run_mod.git_info("24542aa") == {"git_head": "24542aa"}


def test_git_head_read_from_the_tree_without_an_override(monkeypatch):
    _git_answers(monkeypatch, "abc123\n", " M a\n?? b\n")
    assert run_mod.git_info(None) == {"git_head": "abc123", "git_dirty": "2 paths"}
    _git_answers(monkeypatch, None)
    assert run_mod.git_info(None) == {"git_head": "unknown (no git repository here)"}


def test_another_baseline_runs_first_and_names_the_speedup_column(capsys):
    records = [record("plugin-O2", PLUGIN_BS1), record("vllm-fusions", FUSIONS_BS1)]
    doc = report.build_document(records, command=COMMAND, environment=ENVIRONMENT,
                                invocation="inv-1", settings={}, configs=[],
                                baseline="plugin-O2")
    fusions = next(r for r in doc["summary"] if r["config"] == "vllm-fusions")
    assert fusions["speedup"] == pytest.approx(PLUGIN_BS1["avg_latency"]
                                               / FUSIONS_BS1["avg_latency"])
    header, _ = report.latency_table(doc["summary"], doc["baseline"])
    assert "speedup vs plugin-O2" in header
    assert "| speedup vs plugin-O2 |" in report.render_markdown(doc, chart=None)
    argv = ["--models", "m", "--model-root", "/r", "--configs", "vllm-O2", "plugin-O2",
            "--baseline", "plugin-O2", "--dry-run"]
    assert run_mod.main(argv) == 0
    first, second = re.findall(r"# \[\d/2\] \S+__(\S+)", capsys.readouterr().out)
    assert (first, second) == ("plugin-O2", "vllm-O2")


def test_yaml_plan():
    pytest.importorskip("yaml")
    assert plan.parse_plan("models: [a]\ntp: [1, 2]\n", ".yaml") == {"models": ["a"], "tp": [1, 2]}


# ---------------------------------------------------------------- statistics and speedups

def test_statistics_come_from_the_recorded_json():
    s = report.latency_stats(BASE_BS1)
    assert s["avg"] == pytest.approx(0.5442, abs=1e-4)
    assert s["p50"] == BASE_BS1["percentiles"]["50"]
    assert s["p90"] == BASE_BS1["percentiles"]["90"]
    assert (s["min"], s["max"], s["n"]) == (0.5431, 0.5452, 8)
    assert 0 < s["stdev"] < 0.001
    # integer keys (the dict before JSON) and a missing percentiles table both work
    assert report.percentile({"percentiles": {50: 0.7}}, 50) == 0.7
    assert report.percentile({"latencies": [1.0, 2.0, 3.0]}, 50) == 2.0


def test_speedups_compare_with_the_baseline_of_the_same_invocation():
    records = suite_records()
    ups = report.speedups(records)
    by = {r["id"]: r for r in records}
    plugin_bs1 = make_run("plugin-O2").id
    assert ups[plugin_bs1]["speedup"] == pytest.approx(
        BASE_BS1["avg_latency"] / PLUGIN_BS1["avg_latency"])
    assert ups[make_run("vllm-fusions").id]["speedup"] < 1
    assert ups[make_run("plugin-O2", bs=64).id]["speedup"] == pytest.approx(
        BASE_BS64["avg_latency"] / PLUGIN_BS64["avg_latency"])
    # throughput: higher is better
    assert ups[make_run("plugin-O2", None, "throughput").id]["speedup"] == pytest.approx(
        5461.33 / 5120.0)
    assert ups[make_run("plugin-only-fuse_act_quant").id]["speedup"] is None
    assert by[plugin_bs1]["status"] == "ok"

    # a baseline from another invocation, a failed one, or none: blank, with the reason
    other = [dict(r, invocation="inv-0") if r["config"] == "vllm-O2" else r for r in records]
    assert report.speedups(other)[plugin_bs1] == {
        "speedup": None, "note": "baseline measured in another invocation"}
    failed = [dict(r, status="failed", result=None) if r["config"] == "vllm-O2" else r
              for r in records]
    assert report.speedups(failed)[plugin_bs1]["note"] == "baseline vllm-O2 failed"
    alone = [r for r in records if r["config"] != "vllm-O2"]
    assert report.speedups(alone)[plugin_bs1] == {"speedup": None,
                                                  "note": "baseline vllm-O2 not run"}
    md = report.render_markdown(document(alone), chart=None)
    assert "Speedup left blank where baseline vllm-O2 not run" in md


# ---------------------------------------------------------------- report.md and results.json

def test_markdown_report():
    doc = document()
    md = report.render_markdown(doc)
    assert md.startswith("# vllm_fusion end-to-end benchmark: NVIDIA H100 80GB HBM3, 2026-11-27")
    assert COMMAND in md
    assert "| vLLM | 0.26.0 |" in md and "c9fc8af809d1baf40bc7a2d767f9de39fab4c735" in md
    latency_rows = [line for line in md.splitlines() if line.startswith("| llama3-8b-fp8 | ")]
    for config, bs in (("vllm-O2", 1), ("vllm-fusions", 1), ("plugin-O2", 1), ("vllm-O2", 64),
                       ("plugin-O2", 64)):
        prefix = f"| llama3-8b-fp8 | {bs} | 1 | {config} | "
        assert any(line.startswith(prefix) for line in latency_rows)
    failed = [line for line in latency_rows if "plugin-only-fuse_act_quant" in line
              and line.startswith("| llama3-8b-fp8 | 1 | 1 |")]
    assert len(failed) == 1 and failed[0].rstrip().endswith("| failed |")
    assert "| baseline | ok |" in md
    speedup = BASE_BS1["avg_latency"] / PLUGIN_BS1["avg_latency"]
    assert f"{speedup:.3f}x" in md
    assert "## Throughput" in md and f"{5461.33 / 5120.0:.3f}x" in md
    assert "## Failures" in md and "illegal memory access" in md
    assert "plugin-only-fuse_act_quant = plugin-without-fuse_norm_quant" in md
    assert "![average latency per configuration](latency.png)" in md
    no_chart = report.render_markdown(doc, chart=None, chart_note="matplotlib is not installed")
    assert "matplotlib is not installed" in no_chart and "latency.png" not in no_chart


def test_results_json_round_trips():
    doc = document()
    text = report.dumps(doc)
    again = report.loads(text)
    assert again == doc
    assert report.render_markdown(again) == report.render_markdown(doc)
    rows = {row["id"]: row for row in again["summary"]}
    assert rows[make_run("plugin-only-fuse_act_quant").id]["status"] == "failed"
    assert again["records"][0]["result"]["percentiles"]["50"] == BASE_BS1["percentiles"]["50"]
    assert again["environment"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert again["command"] == COMMAND
    with pytest.raises(ValueError, match="schema"):
        report.loads(json.dumps({**doc, "schema": 0}))


def test_chart(tmp_path):
    groups, configs = report.chart_data(document()["summary"])
    assert list(groups) == ["llama3-8b-fp8\nbs=1", "llama3-8b-fp8\nbs=64"]
    assert configs == ["vllm-O2", "vllm-fusions", "plugin-O2",
                       "plugin-only-fuse_act_quant = plugin-without-fuse_norm_quant"]
    assert groups["llama3-8b-fp8\nbs=1"][configs[3]] == "failed"
    assert report.write_chart(document([]), str(tmp_path / "none.png")) is not None
    pytest.importorskip("matplotlib")
    assert report.write_chart(document(), str(tmp_path / "latency.png")) is None
    assert (tmp_path / "latency.png").stat().st_size > 1000


# ---------------------------------------------------------------- the runner, on a stand-in vLLM

def test_suite_records_a_failure_and_goes_on(tmp_path, monkeypatch, capsys):
    """A stand-in interpreter plays `python -m vllm.entrypoints.cli.main bench latency`: it
    writes recorded JSON, or fails for the plugin run."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n" + (
        "import json, os, sys\n"
        "a = sys.argv\n"
        "assert os.environ['VLLM_DISABLE_COMPILE_CACHE'] == '1'\n"
        "if 'VLLM_PLUGINS' not in os.environ:\n"
        "    print('RuntimeError: CUDA error: an illegal memory access was encountered')\n"
        "    sys.exit(1)\n"
        "json.dump(%r, open(a[a.index('--output-json') + 1], 'w'))\n" % BASE_BS1))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(run_mod, "capture_environment", lambda python, head: dict(ENVIRONMENT))
    out = tmp_path / "out"
    rc = run_mod.main(["--models", "llama3-8b-fp8", "--batch-sizes", "1", "--configs", "vllm-O2",
                       "plugin-O2", "--model-root", "/opt/devpack/models", "--python", str(fake),
                       "--out", str(out)])
    assert rc == 1
    doc = report.loads((out / "results.json").read_text())
    status = {r["config"]: r["status"] for r in doc["records"]}
    assert status == {"vllm-O2": "ok", "plugin-O2": "failed"}
    failed = doc["records"][1]
    assert "illegal memory access" in failed["log_tail"]
    assert failed["env"]["VLLM_PLUGINS"] is None
    assert doc["records"][0]["result"]["latencies"] == BASE_BS1["latencies"]
    md = (out / "report.md").read_text()
    assert "plugin-O2 FAILED" in md and "illegal memory access" in md
    assert os.path.exists(out / "runs" / f"{make_run('plugin-O2').id}.log")


HANGING_VLLM = """
import multiprocessing, os, sys, time

def worker_waits_for_the_device():
    time.sleep(600)

def engine_waits_for_its_worker():
    child = multiprocessing.get_context("spawn").Process(target=worker_waits_for_the_device)
    child.start()
    print("worker started", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    assert os.environ["PYTHONFAULTHANDLER"] == "1"
    engine_waits_for_its_worker()
"""


def test_a_run_past_its_timeout_leaves_every_process_stack_in_the_log(tmp_path, monkeypatch):
    """A stand-in vLLM that hangs in two processes: --timeout stops the whole group, and the log
    shows where each process waited (SIGABRT + the fault handler), so a hang can be located."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n" + HANGING_VLLM)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(run_mod, "capture_environment", lambda python, head: dict(ENVIRONMENT))
    monkeypatch.setattr(run_mod, "STACK_DUMP_GRACE_S", 10)
    out = tmp_path / "out"
    start = time.monotonic()
    rc = run_mod.main(["--models", "llama3-8b-fp8", "--batch-sizes", "1", "--configs",
                       "plugin-O2", "--baseline", "plugin-O2", "--model-root",
                       "/opt/devpack/models", "--python", str(fake), "--out", str(out),
                       "--timeout", "8"])
    assert rc == 1 and time.monotonic() - start < 60
    record = report.loads((out / "results.json").read_text())["records"][0]
    assert record["status"] == "failed"
    assert "--timeout (the Python stacks of its processes are in the log)" in record["error"]
    log = (out / record["log"]).read_text()
    assert "worker started" in log
    assert "in engine_waits_for_its_worker" in log, log
    assert "in worker_waits_for_the_device" in log, log


def test_resume_reuses_only_whole_comparisons_of_one_invocation():
    configs = [CONFIGS["vllm-O2"], CONFIGS["plugin-O2"]]
    runs = plan.expand_runs(["llama3-8b-fp8"], [1, 64], [1], configs, SETTINGS)
    done = {r.fingerprint(): {"status": "ok", "invocation": "call-1"} for r in runs}
    # bs 1 complete in call 1; bs 64: only the baseline (the call was killed), or split over calls
    del done[runs[3].fingerprint()]
    assert run_mod.complete_groups(runs, done) == {runs[0].fingerprint(), runs[1].fingerprint()}
    done[runs[3].fingerprint()] = {"status": "ok", "invocation": "call-2"}
    assert run_mod.complete_groups(runs, done) == {runs[0].fingerprint(), runs[1].fingerprint()}
    other = plan.Settings(load_format="dummy", model_root="/opt/devpack/models", iters=20)
    assert run_mod.complete_groups(plan.expand_runs(["llama3-8b-fp8"], [1], [1], configs, other),
                                   done) == set()
