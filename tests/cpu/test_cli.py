"""``vllm-fusion doctor``."""

import json

import pytest

from vllm_fusion.cli import main
from vllm_fusion.passes.registry import FUSIONS


def test_doctor_json_names_versions_kernels_and_fusions(capsys, kernels):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vllm_supported"] == ["0.26.0", "0.33.0"]
    assert report["vllm"] in report["vllm_supported"]
    assert report["kernels"]["loaded"] is True
    assert report["fusions"]["fuse_norm_quant"] == "vllm_fusion pass"
    assert report["fusions"]["fuse_allreduce_rms"] == "vllm_fusion pass"
    assert report["fusions"]["fuse_attn_quant"] == "vllm_fusion pass"
    from vllm_fusion import compat

    on_026 = compat.release() is compat.VLLM_0_26
    assert report["fusions"]["fuse_gemm_comms"] == (
        "vLLM's pass (not yet replaced)" if on_026 else "none (vLLM 0.33.0 has no pass)")
    assert len(report["fusions"]) == 9


def test_doctor_says_what_the_installed_vllm_supports(capsys, kernels):
    from vllm_fusion import compat

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    api = report["vllm_api"]
    assert api["release"] == compat.release().version == report["vllm"]
    # The registry decides what the package owns; the report keeps its (vLLM pass) order.
    owned = [f.flag for f in FUSIONS if f.package_pass]
    assert api["owned"] == owned
    assert {"fuse_act_padding", "fuse_norm_quant", "fuse_act_quant", "fuse_rope_kvcache",
            "enable_qk_norm_rope_fusion"} <= set(owned)
    assert not set(owned) & set(api["delegated"] + api["unavailable"])
    assert {"fuse_norm_quant", "fuse_act_quant", "fuse_allreduce_rms"} <= set(
        api["pass_config_fusion_flags"])
    if compat.release() is compat.VLLM_0_26:
        assert {"enable_sp", "fuse_gemm_comms"} <= set(api["pass_config_fusion_flags"])
        assert api["additional_config_settings"] == [] and api["unavailable"] == []
        assert "fuse_gemm_comms" in api["delegated"] and api["norm_canonicalization"] == []
        assert report["fusions"]["enable_sp"] == "vllm_fusion pass"
    else:
        assert not {"enable_sp", "fuse_gemm_comms"} & set(api["pass_config_fusion_flags"])
        assert api["additional_config_settings"] == [
            "enable_sp", "fuse_gemm_comms", "sp_min_token_num"]
        assert api["unavailable"] == ["fuse_gemm_comms"]
        assert report["fusions"]["enable_sp"].startswith(
            "vllm_fusion pass (off on vLLM 0.33.0: its model runner no longer pads")
        assert api["norm_canonicalization"] == ["AddRMSNormFusionPass", "RMSNormReshapeFusionPass"]


def test_doctor_table(capsys, kernels):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "vllm_fusion 0.1.0" in out and "kernels loaded" in out and "fuse_act_quant" in out
    assert "API as the package uses it" in out and "from additional_config" in out


def test_doctor_reports_probes_and_levels(capsys, kernels):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == "sm90"  # the simulated H100
    assert report["nvlink_multicast"].startswith("unknown")
    assert report["flashinfer_ops"] and report["aiter_ops"]
    assert report["levels"]["O0"] == []
    assert {"fuse_norm_quant", "fuse_act_quant"} <= set(report["levels"]["O2"])


NINE = ("enable_sp", "fuse_gemm_comms", "fuse_act_padding", "fuse_allreduce_rms",
        "fuse_norm_quant", "fuse_act_quant", "fuse_rope_kvcache", "fuse_attn_quant",
        "enable_qk_norm_rope_fusion")


@pytest.mark.parametrize("platform", ["sm80", "sm90", "sm100", "gfx942"])
def test_matrix_prints_all_nine_fusions_with_status_and_reason(capsys, monkeypatch, platform):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["matrix", "--platform", platform, "--tp", "2", "--level", "O2"]) == 0
    out = capsys.readouterr().out
    assert f"{platform} (simulated), TP=2, unquantized, -O2" in out
    rows = [line for line in out.splitlines() if any(f" {f} " in line for f in NINE)]
    assert len(rows) == 9
    for flag, row in zip(NINE, rows):
        cells = [c.strip() for c in row.strip("│┃ ").split("│")]
        assert cells[0] == flag and cells[1] in ("on", "off", "idle") and cells[3], row


@pytest.mark.parametrize("platform", ["sm80", "sm90", "sm100", "gfx942"])
def test_matrix_json(capsys, platform):
    assert main(["matrix", "--platform", platform, "--tp", "2", "--level", "O2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    decisions = report["levels"]["O2"]
    assert tuple(decisions) == NINE
    assert all(d["status"] in ("on", "off", "idle") and d["reason"] for d in decisions.values())
    # TP2 message sizes are measured on sm90 only; gfx942 runs vLLM's AITER pass.
    assert decisions["fuse_allreduce_rms"]["enabled"] == (platform in ("sm90", "gfx942"))
    assert decisions["fuse_rope_kvcache"]["enabled"] is False
    assert decisions["fuse_act_padding"]["enabled"] is True
    assert decisions["fuse_act_padding"]["implementation"] == "vllm_fusion"


def test_matrix_all_levels_and_explicit_flags(capsys):
    assert main(["matrix", "--platform", "sm90", "--quant", "fp8-group", "--json",
                 "--set", "fuse_norm_quant=false"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["levels"]) == ["O0", "O1", "O2", "O3"]
    assert report["levels"]["O2"]["fuse_norm_quant"]["enabled"] is False
    assert report["levels"]["O2"]["fuse_act_quant"]["status"] == "on"


def test_matrix_without_platform_probes_this_machine(capsys):
    assert main(["matrix", "--level", "O2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["simulated"] is False and report["platform"] == "sm90"


def test_matrix_on_a_machine_without_gpu_says_so(capsys, monkeypatch):
    from vllm_fusion import matrix

    monkeypatch.setattr(matrix, "platform_id", lambda platform=None: "cpu")
    assert main(["matrix", "--level", "O2"]) == 0
    assert "no supported GPU" in capsys.readouterr().out
    assert main(["matrix", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == "cpu" and "no supported GPU" in report["note"]
    assert not any(d["enabled"] for level in report["levels"].values() for d in level.values())


@pytest.mark.parametrize("argv, allowed", [
    (["--platform", "sm75"], "choose from 'sm80', 'sm89', 'sm90', 'sm100', 'sm120', 'gfx90a', "
                             "'gfx942', 'gfx950'"),
    (["--quant", "int4"], "choose from 'unquantized', 'fp8-static', 'fp8-per-token', "
                          "'fp8-group', 'nvfp4'"),
    (["--level", "O4"], "choose from O0, O1, O2, O3"),
    (["--tp", "0"], "a positive integer"),
    (["--set", "fuse_bogus=true"], "FLAG one of enable_sp"),
])
def test_matrix_bad_values_name_the_allowed_ones(capsys, argv, allowed):
    with pytest.raises(SystemExit) as excinfo:
        main(["matrix", *argv])
    assert excinfo.value.code == 2
    assert allowed in capsys.readouterr().err
