"""What runs each fusion on AMD GPUs (gfx90a, gfx942, gfx950): this package's HIP kernel,
vLLM's own AITER pass (where AITER has the fused op) or nothing; AITER present and absent;
the same decisions from a VllmConfig on a simulated MI300X; doctor and matrix output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cpu.fake_platform import install_fake_rocm_platform, simulate_aiter
from vllm_fusion.matrix import load_full_matrix
from vllm_fusion.resolver import resolve_fusion, resolve_setup, simulated_setup

ROCM = ("gfx90a", "gfx942", "gfx950")
MI3XX = ("gfx942", "gfx950")


def decide(flag, platform, *, aiter=True, **kwargs):
    return resolve_fusion(flag, simulated_setup(platform, has_aiter=aiter, **kwargs))


# ---------------------------------------------------------------- the matrix's ROCm rows

def test_every_fusion_has_a_row_for_every_amd_gpu():
    m = load_full_matrix()
    assert tuple(p for p, info in m.platforms.items() if info.vendor == "rocm") == ROCM
    for flag, cap in m.fusions.items():
        assert tuple(cap.rocm) == ROCM, flag
        for pid, row in cap.rocm.items():
            assert row.reason, (flag, pid)
            assert (row.route != "off") == (pid in cap.platforms), (flag, pid)
        # vLLM 0.26 turns AITER on for MI300/MI350 only: gfx90a never takes the AITER route.
        assert cap.rocm["gfx90a"].route != "aiter", flag


def test_aiter_ops_named_are_the_ones_vllm_calls():
    """Every AITER op of the matrix is imported by vLLM 0.26's AITER code paths."""
    import vllm

    root = Path(vllm.__file__).parent
    sources = "".join(p.read_text() for p in (
        root / "_aiter_ops.py",
        root / "distributed/device_communicators/aiter_custom_all_reduce.py"))
    for flag, cap in load_full_matrix().fusions.items():
        for row in cap.rocm.values():
            for op in row.all_aiter_ops():
                module, _, name = f"aiter.{op}".rpartition(".")
                assert re.search(rf"from {re.escape(module)} import \(?[\w\s,]*?\b{name}\b|"
                                 rf"{re.escape(module)}\.{name}\b|rocm_aiter\.{name}\(",
                                 sources, re.S), (flag, op)


# ---------------------------------------------------------------- resolution, gfx942 and SM90

# (flag, quant, tp, AITER present) -> (enabled, status, route)
CASES = [
    # RMSNorm + quant: AITER's fused ops for per-token and group-128 FP8.
    ("fuse_norm_quant", "fp8-per-token", 1, True, (True, "on", "aiter")),
    ("fuse_norm_quant", "fp8-group", 1, True, (True, "on", "aiter")),
    ("fuse_norm_quant", "fp8-static", 1, True, (True, "idle", "vllm_fusion")),
    ("fuse_norm_quant", "fp8-per-token", 1, False, (True, "idle", "vllm_fusion")),
    ("fuse_norm_quant", "fp8-group", 1, False, (True, "on", "vllm_fusion")),
    # SiLU*Mul + quant: AITER has group-128 only; per-token is this package's kernel.
    ("fuse_act_quant", "fp8-group", 1, True, (True, "on", "aiter")),
    ("fuse_act_quant", "fp8-per-token", 1, True, (True, "on", "vllm_fusion")),
    ("fuse_act_quant", "fp8-group", 1, False, (True, "on", "vllm_fusion")),
    # vLLM's own AITER-only fusions: off without AITER.
    ("fuse_allreduce_rms", "fp8-group", 2, True, (True, "on", "aiter")),
    ("fuse_allreduce_rms", "fp8-group", 2, False, (False, "off", "")),
    ("fuse_allreduce_rms", "unquantized", 1, True, (False, "off", "")),
    ("enable_sp", "unquantized", 2, True, (False, "off", "")),
]


@pytest.mark.parametrize("flag, quant, tp, aiter, expected", CASES)
def test_gfx942_routes(flag, quant, tp, aiter, expected):
    d = decide(flag, "gfx942", aiter=aiter, tp=tp, quant=quant)
    assert (d.enabled, d.status, d.route) == expected, d
    if d.route == "aiter":
        assert d.implementation == "vllm" and "AITER: " in d.reason, d
    if flag in ("fuse_norm_quant", "fuse_act_quant") and d.route == "vllm_fusion":
        assert d.implementation == "vllm_fusion"
        if not aiter:
            assert "AITER not enabled" in d.reason and "HIP kernel" in d.reason, d
    if not aiter and flag == "fuse_allreduce_rms" and tp == 2:
        assert "AITER not enabled" in d.reason, d


@pytest.mark.parametrize("quant", ["fp8-static", "fp8-per-token", "fp8-group"])
@pytest.mark.parametrize("aiter", [True, False])
def test_sm90_ignores_aiter(quant, aiter):
    for flag in ("fuse_norm_quant", "fuse_act_quant"):
        d = decide(flag, "sm90", aiter=aiter, quant=quant)
        assert d.route == "vllm_fusion" and d.implementation == "vllm_fusion", d
        assert "AITER" not in d.reason and "ROCm" not in d.reason


def test_aiter_without_the_op_falls_back_to_the_hip_kernel():
    d = decide("fuse_norm_quant", "gfx942", quant="fp8-group", aiter_ops=())
    assert d.route == "vllm_fusion" and d.status == "on", d
    assert "lacks ops.triton.fused_fp8_quant.fused_rms_fp8_group_quant" in d.reason
    # The ops of the other scheme are irrelevant to this one.
    d = decide("fuse_norm_quant", "gfx942", quant="fp8-group",
               aiter_ops=("ops.triton.fused_fp8_quant.fused_rms_fp8_group_quant",))
    assert d.route == "aiter", d


def test_aiter_route_needs_no_package_kernels():
    d = decide("fuse_act_quant", "gfx950", quant="fp8-group", kernels_loaded=False)
    assert d.enabled and d.route == "aiter"
    d = decide("fuse_act_quant", "gfx950", aiter=False, quant="fp8-group", kernels_loaded=False)
    assert not d.enabled and d.reason == "vllm_fusion kernels not loaded"


@pytest.mark.parametrize("flag", ["fuse_norm_quant", "fuse_act_quant", "fuse_allreduce_rms",
                                  "fuse_attn_quant"])
def test_gfx90a_explicit_true_is_off_with_a_warning(flag):
    d = decide(flag, "gfx90a", tp=2, quant="fp8-group", flags={flag: True})
    assert not d.enabled and d.warning.startswith(f"{flag} is turned off on gfx90a: "), d


def test_aiter_only_fusion_explicit_true_without_aiter_warns():
    flag = "fuse_allreduce_rms"
    d = decide(flag, "gfx942", aiter=False, tp=2, flags={flag: True})
    assert not d.enabled and "AITER not enabled" in d.warning, d
    assert decide(flag, "gfx942", tp=2, flags={flag: True}).route == "aiter"


@pytest.mark.parametrize("platform", ROCM)
@pytest.mark.parametrize("aiter", [True, False])
def test_rope_kvcache_aiter_on_mi3xx_else_the_hip_kernel(platform, aiter):
    flag = "fuse_rope_kvcache"
    d = decide(flag, platform, aiter=aiter, flags={flag: True})
    assert d.enabled and d.warning is None, d
    if aiter and platform in MI3XX:
        # vLLM's RopeKVCacheFusionPass with AITER's fused_qk_rope_reshape_and_cache.
        assert d.route == "aiter" and d.implementation == "vllm", d
    else:
        assert d.route == "vllm_fusion" and d.implementation == "vllm_fusion", d
    # Off by default, like on CUDA, until measured.
    assert not decide(flag, platform, aiter=aiter).enabled


@pytest.mark.parametrize("platform", ROCM)
def test_qk_norm_rope_is_the_package_kernel_on_every_rocm_chip(platform):
    flag = "enable_qk_norm_rope_fusion"
    d = decide(flag, platform, flags={flag: True})
    assert d.enabled and d.route == "vllm_fusion" and d.implementation == "vllm_fusion", d


@pytest.mark.parametrize("platform", ["gfx90a", "gfx942", "gfx950"])
@pytest.mark.parametrize("aiter", [True, False])
def test_norm_padding_is_the_package_pass_on_every_rocm_chip(platform, aiter):
    # The package's pass picks AITER's kernel itself where AITER has it, else its HIP kernel.
    d = decide("fuse_act_padding", platform, aiter=aiter, flags={"fuse_act_padding": True})
    assert d.enabled and d.route == "vllm_fusion", d


def test_force_schemes_fuses_static_fp8_with_the_hip_kernel():
    d = decide("fuse_norm_quant", "gfx942", quant="fp8-static", force_schemes=True)
    assert (d.status, d.route) == ("on", "vllm_fusion") and "fp8-static" in d.schemes


def test_every_rocm_decision_names_its_route():
    for platform in ROCM:
        for quant in ("unquantized", "fp8-static", "fp8-per-token", "fp8-group"):
            for aiter in (True, False):
                setup = simulated_setup(platform, tp=2, quant=quant, has_aiter=aiter)
                for flag, d in resolve_setup(setup).items():
                    assert d.route in (("vllm_fusion", "vllm", "aiter") if d.enabled else ("",))
                    assert d.route != "aiter" or (aiter and platform in MI3XX), (flag, d)


# ---------------------------------------------------------------- from a VllmConfig on a simulated MI300X

@pytest.fixture
def mi300x():
    return install_fake_rocm_platform("gfx942")


@pytest.mark.parametrize("aiter", [True, False])
def test_settings_on_simulated_gfx942(mi300x, monkeypatch, request, aiter):
    from tests.cpu.compile_harness import make_vllm_config
    from vllm_fusion.config import resolve
    from vllm_fusion.resolver import Setup

    from vllm_fusion.passes.pass_manager_hook import install_level_defaults

    if not aiter:  # then this package's kernels run the quant fusions
        request.getfixturevalue("kernels")
    simulate_aiter(monkeypatch, aiter)
    install_level_defaults()  # the matrix decides the -O2 defaults, as with the plugin loaded
    config = make_vllm_config(optimization_level=2, quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic"})
    setup = Setup.from_vllm_config(config)
    assert (setup.platform, setup.quant, setup.has_aiter) == ("gfx942", "fp8-per-token", aiter)
    assert bool(setup.aiter_ops) == aiter
    settings = resolve(config)
    assert settings.platform == "gfx942"
    assert settings.fusions["fuse_norm_quant"] and settings.fusions["fuse_act_quant"]
    # Per-token RMSNorm + quant: AITER's fused op through vLLM's pass, else this package's
    # pass (which leaves per-token to Inductor by the matrix's verdict).
    assert ("fuse_norm_quant" in settings.delegated) == aiter
    assert "fuse_act_quant" not in settings.delegated  # per-token: only this package has it


def test_simulated_arch_reaches_the_resolver(mi300x):
    from tests.cpu.fake_platform import simulated_gcn_arch
    from vllm_fusion.matrix import platform_id

    assert platform_id() == "gfx942"
    with simulated_gcn_arch("gfx950"):
        assert platform_id() == "gfx950"
    with simulated_gcn_arch("gfx90a"):
        assert platform_id() == "gfx90a"


# ---------------------------------------------------------------- CLI

def test_matrix_gfx942_table_shows_the_aiter_route(capsys, monkeypatch):
    from vllm_fusion.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["matrix", "--platform", "gfx942", "--quant", "fp8-group", "--tp", "2",
                 "--level", "O2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    for flag in ("fuse_norm_quant", "fuse_act_quant", "fuse_allreduce_rms"):
        assert "│ aiter" in rows[flag] and "│ on" in rows[flag], rows[flag]


def test_matrix_gfx942_json_without_aiter(capsys):
    from vllm_fusion.cli import main

    assert main(["matrix", "--platform", "gfx942", "--quant", "fp8-group", "--tp", "2",
                 "--level", "O2", "--no-aiter", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["has_aiter"] is False
    o2 = report["levels"]["O2"]
    assert o2["fuse_norm_quant"]["route"] == "vllm_fusion"
    assert o2["fuse_act_quant"]["route"] == "vllm_fusion"
    assert not o2["fuse_allreduce_rms"]["enabled"]
    assert "AITER not enabled" in o2["fuse_allreduce_rms"]["reason"]


@pytest.mark.parametrize("aiter", [True, False])
def test_doctor_on_simulated_gfx942(mi300x, monkeypatch, capsys, aiter):
    from vllm_fusion.cli import main

    simulate_aiter(monkeypatch, aiter)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == "gfx942"
    assert report["aiter_enabled"] == ("yes" if aiter else
                                       "no (needs ROCm gfx942/gfx950, amd-aiter, "
                                       "VLLM_ROCM_USE_AITER=1)")
    n = len({op for cap in load_full_matrix().fusions.values() for row in cap.rocm.values()
             for op in row.all_aiter_ops()})
    assert report["aiter_ops"].startswith(f"{n}/{n} present" if aiter else f"none of the {n}")
    # Unquantized at -O2, TP=1: nothing to fuse by AITER; the quant fusions are on (idle).
    assert report["routes_O2"]["fuse_allreduce_rms"] == "off"
    assert report["routes_O2"]["enable_sp"] == "off"


# ---------------------------------------------------------------- vLLM's AITER passes on traced graphs

FP8_MODELS = {
    "fp8-per-token": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "fp8-group128": {"quant_method": "fp8", "activation_scheme": "dynamic",
                     "weight_block_size": [128, 128]},
}


def compile_on_gfx942(monkeypatch, scheme: str, aiter: bool):
    """The post-grad passes of a small FP8 decoder stack on a simulated MI300X, through the
    plugin's hook. AITER is simulated: vLLM registers its rocm_aiter_* ops (their fake
    implementations need no AITER) and builds its AITER passes, as with AITER installed."""
    import importlib
    import sys

    import torch

    from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
    from tests.cpu.models import QuantizedDecoderStack
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_fake_rocm_platform("gfx942")
    simulate_aiter(monkeypatch, aiter)
    if aiter:
        import vllm._aiter_ops as vllm_aiter

        vllm_aiter.rocm_aiter_ops.register_ops_once()
    install_pass_manager_hook()
    # vLLM imports its AITER passes when the pass manager module loads, if AITER is on.
    module = sys.modules.get("vllm.compilation.passes.pass_manager")
    if module is not None:
        importlib.reload(module)
    config = make_vllm_config(
        custom_ops=["+quant_fp8", "+silu_and_mul", "+rms_norm"], optimization_level=2,
        quantization_config=FP8_MODELS[scheme])
    return run_post_grad_passes(
        lambda: QuantizedDecoderStack(256, 512, torch.bfloat16, 1e-6, scheme),
        lambda: [torch.empty(7, 256, dtype=torch.bfloat16)], config)


def test_aiter_route_fuses_per_token_norm_quant_with_vllms_aiter_pass(monkeypatch):
    run = compile_on_gfx942(monkeypatch, "fp8-per-token", aiter=True)
    # Delegated: vLLM's passes for fuse_norm_quant, not the package's.
    assert run.matches["vllm:RocmAiterRMSNormQuantFusionPass"] == 4
    assert "vllm_fusion:RMSNormQuantFusionPass" not in run.matches
    assert run.count("vllm.rocm_aiter_rmsnorm_fused_dynamic_quant.default") == 1
    assert run.count("vllm.rocm_aiter_rmsnorm_fused_add_dynamic_quant.default") == 3
    assert run.count("vllm.rocm_aiter_per_token_quant.default", after=False) == 6


def test_aiter_route_fuses_group_quant_norm_and_act(monkeypatch):
    run = compile_on_gfx942(monkeypatch, "fp8-group128", aiter=True)
    assert run.matches["vllm:RocmAiterRMSNormQuantFusionPass"] == 4
    assert run.matches["vllm:RocmAiterSiluMulFp8GroupQuantFusionPass"] == 2
    assert not any(k.startswith("vllm_fusion:") for k in run.matches)
    assert run.count("vllm.rocm_aiter_act_mul_and_fp8_group_quant.default") == 2
    assert run.count("vllm.rocm_aiter_rmsnorm_with_add_fp8_group_quant.default") == 3
    assert run.count("vllm.rocm_aiter_group_fp8_quant.default") == 0


@pytest.mark.skipif(not __import__("vllm_fusion.aiter").aiter.aiter_available(),
                    reason="AMD AITER (amd-aiter) is not importable here")
def test_real_aiter_has_every_op_the_matrix_routes_to():
    from vllm_fusion.aiter import aiter_available

    for cap in load_full_matrix().fusions.values():
        for pid, row in cap.rocm.items():
            assert aiter_available(*row.all_aiter_ops()), (cap.flag, pid)
