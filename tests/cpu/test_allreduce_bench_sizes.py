"""The all-reduce benchmark's matrix row (benchmarks/kernels/bench_allreduce.py): which message
sizes the measurements say to fuse, one-shot / push / two-shot, and the matrix edit. No GPU."""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.cpu.scripts import ROOT, load_script

H100_TP2 = ROOT / "docs/benchmarks/2026-11-27-h100-allreduce-rms/ar_tp2.json"
MATRIX = ROOT / "vllm_fusion/data/matrix.toml"


@pytest.fixture(scope="module")
def bench():
    return load_script("vllm_fusion_bench_allreduce", "benchmarks/kernels/bench_allreduce.py")


def _rows(table, hidden=4096):
    """(mib, fused_1shot, fused_push, fused_2shot, vllm) tuples -> benchmark rows."""
    names = ("fused-1shot", "fused-push", "fused-2shot", "vllm+inductor")
    return [{"tokens": 0, "hidden": hidden, "mib": mib,
             "us": {n: v for n, v in zip(names, times) if v is not None}}
            for mib, *times in table]


def test_the_committed_h100_measurement_gives_the_committed_matrix_row(bench):
    rows = json.loads(H100_TP2.read_text())["rows"]
    suggested = bench.suggest_sizes(rows)
    assert suggested == {"min_mib": 2.0, "max_mib": 64.0, "one_shot_mib": 64.0, "push_mib": 0.0}
    committed = tomllib.loads(MATRIX.read_text())["fusions"]["fuse_allreduce_rms"][
        "message_sizes"]["sm90"]["tp2"]
    assert {k: float(committed.get(k, 0)) for k in suggested} == suggested


def test_push_winning_small_messages_fuses_from_zero(bench):
    rows = _rows([
        (0.008, 8.0, 5.0, 11.0, 6.5),
        (0.5, 11.0, 9.0, 15.0, 9.5),
        (2.0, 15.0, 16.0, 19.0, 16.5),
        (8.0, 40.0, 45.0, 38.0, 63.0),
        (32.0, 136.0, None, 120.0, 187.0),   # push does not fit: not measured
    ])
    assert bench.suggest_sizes(rows) == {"min_mib": 0.0, "max_mib": 32.0,
                                         "one_shot_mib": 2.0, "push_mib": 0.5}


def test_a_size_lost_at_one_hidden_size_is_lost(bench):
    rows = (_rows([(0.25, 9.0, None, 12.0, 10.0), (2.0, 15.0, None, 19.0, 16.5)], hidden=4096)
            + _rows([(0.25, 10.0, None, 16.0, 8.6), (2.0, 16.0, None, 20.0, 17.6)], hidden=8192))
    assert bench.suggest_sizes(rows) == {"min_mib": 2.0, "max_mib": 2.0,
                                         "one_shot_mib": 2.0, "push_mib": 0.0}


def test_the_longest_winning_run_is_taken(bench):
    rows = _rows([(1, 5, None, 6, 6), (2, 9, None, 9, 8), (4, 9, None, 9, 10),
                  (8, 9, None, 9, 10), (16, 30, None, 29, 20)])
    assert bench.suggest_sizes(rows) == {"min_mib": 4.0, "max_mib": 8.0,
                                         "one_shot_mib": 8.0, "push_mib": 0.0}


def test_no_row_where_the_fused_kernel_never_wins(bench):
    assert bench.suggest_sizes(_rows([(0.5, 22.5, 20.0, 27.8, 10.0),
                                      (2.0, 36.0, None, 34.0, 20.0)])) is None


def _sizes_table(text: str, platform: str = "sm90") -> dict:
    return tomllib.loads(text)["fusions"]["fuse_allreduce_rms"]["message_sizes"][platform]


def test_update_matrix_replaces_the_row_of_that_tp_size_only(bench):
    text = MATRIX.read_text()
    row = bench.matrix_row_text(2, {"min_mib": 0.0, "max_mib": 64.0, "one_shot_mib": 64.0,
                                    "push_mib": 1.0})
    updated = tomllib.loads(bench.update_matrix(text, "sm90", row))
    before = tomllib.loads(text)
    old_row = _sizes_table(text)["tp2"]
    new_row = updated["fusions"]["fuse_allreduce_rms"]["message_sizes"]["sm90"]["tp2"]
    assert new_row == {"min_mib": 0, "max_mib": 64, "one_shot_mib": 64, "push_mib": 1,
                       "measured": old_row["measured"]}
    # Everything outside the row is unchanged.
    before["fusions"]["fuse_allreduce_rms"]["message_sizes"]["sm90"]["tp2"] = new_row
    assert updated == before


def test_update_matrix_replaces_a_row_without_measured_text(bench):
    text = ("[fusions.fuse_allreduce_rms.message_sizes.sm90]\n"
            "tp2 = { min_mib = 2, max_mib = 64, one_shot_mib = 64 }\nmeasured = \"x\"\n\n"
            "[fusions.fuse_norm_quant]\nlevel = 1\n")
    row = bench.matrix_row_text(2, {"min_mib": 1.0, "max_mib": 32.0, "one_shot_mib": 32.0,
                                    "push_mib": 1.0})
    updated_text = bench.update_matrix(text, "sm90", row)
    updated = tomllib.loads(updated_text)
    assert _sizes_table(updated_text) == {
        "tp2": {"min_mib": 1, "max_mib": 32, "one_shot_mib": 32, "push_mib": 1},
        "measured": "x"}
    assert updated["fusions"]["fuse_norm_quant"] == {"level": 1}


def test_update_matrix_adds_a_missing_tp_size(bench):
    text = MATRIX.read_text().replace("\ntp4 = ", "\nremoved_tp4 = ")
    assert "tp4" not in _sizes_table(text)
    row = bench.matrix_row_text(4, {"min_mib": 0.5, "max_mib": 64.0, "one_shot_mib": 2.0,
                                    "push_mib": 0.0})
    table = _sizes_table(bench.update_matrix(text, "sm90", row))
    assert table["tp4"] == {"min_mib": 0.5, "max_mib": 64, "one_shot_mib": 2, "push_mib": 0}
    assert table["tp2"] == _sizes_table(text)["tp2"]


def test_update_matrix_refuses_a_platform_without_a_table(bench):
    with pytest.raises(SystemExit, match=r"no \[fusions.fuse_allreduce_rms.message_sizes.sm75\]"):
        bench.update_matrix(MATRIX.read_text(), "sm75", "tp2 = { max_mib = 1 }")
