"""``vllm-fusion doctor``."""

import json

from vllm_fusion.cli import main


def test_doctor_json_names_versions_kernels_and_fusions(capsys, kernels):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vllm"] == "0.26.0" and report["vllm_supported"] == ["0.26.0"]
    assert report["kernels"]["loaded"] is True
    assert report["fusions"]["fuse_norm_quant"] == "vllm_fusion pass"
    assert report["fusions"]["fuse_allreduce_rms"] == "vLLM's pass (not yet replaced)"
    assert len(report["fusions"]) == 9


def test_doctor_table(capsys, kernels):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "vllm_fusion 0.1.0" in out and "kernels loaded" in out and "fuse_act_quant" in out
