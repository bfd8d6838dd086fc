"""The resolver, cell by cell: every platform x TP1/TP2 x scheme x O0-O3, the
override rules, and the additional_config settings it reads."""

from __future__ import annotations

import itertools

import pytest

from vllm_fusion import compat
from vllm_fusion.matrix import load_full_matrix, load_matrix
from vllm_fusion.passes.registry import by_flag
from vllm_fusion.resolver import resolve_fusion, resolve_setup, simulated_setup

PLATFORMS = ("sm80", "sm89", "sm90", "sm100", "sm120", "gfx90a", "gfx942", "gfx950")
SCHEMES = ("unquantized", "fp8-static", "fp8-per-token", "fp8-group", "nvfp4")
NINE = ("enable_sp", "fuse_gemm_comms", "fuse_act_padding", "fuse_allreduce_rms",
        "fuse_norm_quant", "fuse_act_quant", "fuse_rope_kvcache", "fuse_attn_quant",
        "enable_qk_norm_rope_fusion")
QUANT_OWNED = ("fuse_norm_quant", "fuse_act_quant")
# Not measured end to end yet: off by default at every level.
ROPE_OWNED = ("fuse_rope_kvcache", "enable_qk_norm_rope_fusion")
OWNED = ("fuse_act_padding", *QUANT_OWNED, *ROPE_OWNED)
# The package's pass, gated by its measured message sizes (vLLM's AITER pass on ROCm).
AR_OWNED = "fuse_allreduce_rms"
# The package's pass on CUDA (vLLM's on ROCm), off by default until measured end to end.
ATTN_OWNED = "fuse_attn_quant"
SP_OWNED = "enable_sp"

# Expectations written out independently of matrix.toml.
FP8_PLATFORMS = {"sm89", "sm90", "sm100", "sm120", "gfx942", "gfx950"}
# Schemes the package fuses by default (the H100 verdicts, inherited elsewhere).
WINS = {"fuse_norm_quant": {"fp8-group"}, "fuse_act_quant": {"fp8-per-token", "fp8-group"}}
# Where the fused all-reduce runs by default at TP2: CUDA platforms with a measured TP2
# message-size threshold (sm90), and vLLM's AITER pass on MI300/MI350.
AR_PLATFORMS = {"sm90", "gfx942", "gfx950"}
# Where the package's norm+pad kernel is built (fused for every scheme: it beat Inductor on H100).
PAD_PLATFORMS = {"sm80", "sm89", "sm90", "sm100", "gfx90a", "gfx942", "gfx950"}
# Schemes that vLLM's AITER passes fuse on MI300/MI350 (AITER is assumed installed there).
AITER_FUSES = {"fuse_norm_quant": {"fp8-per-token", "fp8-group"}, "fuse_act_quant": {"fp8-group"}}

CELLS = list(itertools.product(PLATFORMS, (1, 2), SCHEMES, (0, 1, 2, 3)))


def expected_enabled(flag: str, platform: str, tp: int, level: int) -> bool:
    if flag == "fuse_act_padding":
        return level >= 1 and platform in PAD_PLATFORMS
    if flag in ROPE_OWNED:
        return False
    if flag in OWNED:
        return level >= 1 and platform in FP8_PLATFORMS
    if flag == AR_OWNED:  # -O2+, TP>1, where a threshold was measured (or AITER runs it)
        return level >= 2 and tp > 1 and platform in AR_PLATFORMS
    # Off by default everywhere in vLLM 0.26.
    return False


def expected_status(flag: str, platform: str, tp: int, scheme: str, level: int) -> str:
    if not expected_enabled(flag, platform, tp, level):
        return "off"
    if flag == "fuse_act_padding":
        return "on"  # independent of the GEMM quantization
    if flag in OWNED:
        # NVFP4 SiLU*Mul: vLLM's own pass keeps the fusion (the package has no kernel).
        vllm_keeps = flag == "fuse_act_quant" and scheme == "nvfp4"
        aiter_fuses = platform in ("gfx942", "gfx950") and scheme in AITER_FUSES[flag]
        return "on" if scheme in WINS[flag] or vllm_keeps or aiter_fuses else "idle"
    return "on"  # fuse_allreduce_rms: AR+RMS always fuses, the quant where supported


def test_matrix_has_the_nine_fusions_every_platform_and_scheme():
    m = load_full_matrix()
    assert tuple(m.fusions) == NINE
    assert tuple(m.platforms) == PLATFORMS
    assert tuple(m.schemes) == SCHEMES
    for flag, cap in m.fusions.items():
        assert set(cap.schemes) == set(SCHEMES), flag
        owned = (*OWNED, AR_OWNED, ATTN_OWNED, SP_OWNED)
        assert cap.implementation == ("vllm_fusion" if flag in owned else "vllm")
        assert cap.unsupported and cap.fuses and cap.default
        for verdict in cap.schemes.values():
            assert verdict.reason
            # No invented numbers: only the package's measured verdicts name a card.
            if cap.implementation == "vllm" or not verdict.platforms:
                assert not verdict.platforms
        assert not cap.tokens  # no token range has been measured yet


def test_measured_verdicts_kept():
    m = load_matrix()
    assert m["fuse_norm_quant"].winning_schemes("sm90") == ("fp8-group",)
    assert m["fuse_act_quant"].winning_schemes("sm90") == ("fp8-per-token", "fp8-group")
    for flag in QUANT_OWNED:
        for name in ("fp8-static", "fp8-per-token", "fp8-group"):
            assert m[flag].schemes[name].measured.startswith("H100 80GB HBM3, 2026-11-27")


@pytest.mark.parametrize("platform, tp, scheme, level", CELLS)
def test_every_cell(platform, tp, scheme, level):
    decisions = resolve_setup(simulated_setup(platform, tp=tp, quant=scheme, level=level))
    assert tuple(decisions) == NINE
    for flag, d in decisions.items():
        assert d.reason, (flag, d)
        assert d.warning is None  # nothing explicit: no warning
        assert d.enabled == expected_enabled(flag, platform, tp, level), (flag, d)
        assert d.status == expected_status(flag, platform, tp, scheme, level), (flag, d)


@pytest.mark.parametrize("platform, tp, scheme, level", CELLS[::7])
def test_explicit_false_always_wins(platform, tp, scheme, level):
    setup = simulated_setup(platform, tp=tp, quant=scheme, level=level,
                            flags=dict.fromkeys(NINE, False))
    for d in resolve_setup(setup).values():
        assert not d.enabled and d.status == "off" and d.explicit
        assert "turned off explicitly" in d.reason


@pytest.mark.parametrize("flag, platform, tp, warns", [
    ("fuse_norm_quant", "sm80", 1, "FP8 activation quantization"),
    ("fuse_act_quant", "gfx90a", 2, "FP8 activation quantization"),
    ("fuse_rope_kvcache", "cpu", 1, "built for CUDA SM80+ and ROCm only"),
    ("enable_qk_norm_rope_fusion", "cpu", 1, "built for CUDA SM80+ and ROCm only"),
    ("fuse_act_padding", "sm120", 1, "not SM120"),
    ("fuse_allreduce_rms", "sm90", 1, "needs TP>=2"),
    ("fuse_allreduce_rms", "sm80", 2, "fi_allreduce_fusion_max_size_mb"),
    ("fuse_allreduce_rms", "sm90", 3, "no measured message-size threshold for TP=3"),
    ("enable_sp", "sm90", 1, "needs TP>=2"),
    ("enable_sp", "gfx942", 2, "SP_MIN_HIDDEN_SIZE"),
    ("fuse_gemm_comms", "sm89", 2, "symmetric memory"),
])
def test_explicit_true_the_hardware_cannot_run_is_off_with_one_warning(flag, platform, tp, warns):
    d = resolve_fusion(flag, simulated_setup(platform, tp=tp, flags={flag: True}))
    assert not d.enabled and d.status == "off"
    assert d.warning.startswith(f"{flag} is turned off on {platform}: ") and warns in d.warning


@pytest.mark.parametrize("flag, platform, tp, scheme, status", [
    ("fuse_norm_quant", "sm90", 1, "fp8-static", "idle"),
    ("fuse_norm_quant", "sm90", 1, "fp8-group", "on"),
    ("fuse_act_quant", "gfx942", 1, "fp8-per-token", "on"),
    ("enable_qk_norm_rope_fusion", "sm90", 1, "unquantized", "on"),
    ("enable_qk_norm_rope_fusion", "gfx950", 1, "nvfp4", "on"),
    ("fuse_attn_quant", "sm90", 1, "fp8-static", "on"),
    ("fuse_attn_quant", "sm90", 1, "fp8-group", "idle"),
    ("fuse_attn_quant", "sm100", 1, "nvfp4", "on"),
    ("enable_sp", "sm90", 2, "fp8-static", "on"),
    ("fuse_gemm_comms", "sm100", 4, "unquantized", "on"),
    ("fuse_allreduce_rms", "sm90", 2, "fp8-per-token", "on"),
])
def test_explicit_true_wins_where_it_can_run(flag, platform, tp, scheme, status):
    setup = simulated_setup(platform, tp=tp, quant=scheme, level=1, flags={flag: True})
    d = resolve_fusion(flag, setup)
    release = compat.release_for(setup.vllm)
    if not release.has_vllm_pass(flag) and by_flag(flag).package_pass is None:
        # vLLM 0.33 removed SP / AsyncTP: nothing can run it, so the explicit True is refused.
        missing = f"vLLM {release.version} has no {flag} pass"
        assert not d.enabled and d.status == "off" and missing in d.reason
        assert d.warning.startswith(f"{flag} is turned off on {platform}: ") and missing in d.warning
        return
    assert d.enabled and d.explicit and d.warning is None and d.status == status
    assert "turned on explicitly" in d.reason


def test_explicit_true_beats_level_and_default_off():
    d = resolve_fusion("fuse_norm_quant", simulated_setup("sm90", level=0,
                                                          flags={"fuse_norm_quant": True}))
    assert d.enabled


def test_missing_requirements_turn_vllm_defaults_off():
    # The package's all-reduce needs no FlashInfer; vLLM's AITER pass needs AITER.
    assert resolve_fusion("fuse_allreduce_rms",
                          simulated_setup("sm90", tp=2, has_flashinfer=False)).enabled
    assert not resolve_fusion("fuse_allreduce_rms",
                              simulated_setup("gfx942", tp=2, has_aiter=False)).enabled
    d = resolve_fusion("enable_qk_norm_rope_fusion",
                       simulated_setup("sm90", dtype="float32",
                                       flags={"enable_qk_norm_rope_fusion": True}))
    assert not d.enabled and "float32" in d.warning


@pytest.mark.parametrize("flag", ROPE_OWNED)
def test_rope_fusions_are_the_package_passes_off_by_default(flag):
    why_off = load_full_matrix().fusions[flag].default  # the matrix's reason, measured or not
    for platform, level in itertools.product(PLATFORMS, (1, 2, 3)):
        d = resolve_fusion(flag, simulated_setup(platform, level=level))
        assert not d.enabled and d.reason == why_off, d
    d = resolve_fusion(flag, simulated_setup("sm90", flags={flag: True}))
    assert d.enabled and d.status == "on" and d.route == "vllm_fusion", d
    assert d.implementation == "vllm_fusion"


def test_rope_kvcache_needs_the_cache_update_in_the_graph():
    on = {"fuse_rope_kvcache": True}
    split = resolve_fusion("fuse_rope_kvcache", simulated_setup("sm90", flags=on,
                                                                kv_update_split=True))
    assert not split.enabled
    assert "compilation_config.splitting_ops contains vllm::unified_kv_cache_update" in \
        split.warning and "remove it from splitting_ops" in split.warning
    partition = simulated_setup("sm90", flags=on, kv_update_split=True, graph_partition=True)
    assert resolve_fusion("fuse_rope_kvcache", partition).enabled
    # QK-norm + RoPE alone does not touch the cache.
    assert resolve_fusion("enable_qk_norm_rope_fusion", simulated_setup(
        "sm90", flags={"enable_qk_norm_rope_fusion": True}, kv_update_split=True)).enabled


def test_rope_kvcache_on_rocm_aiter_then_the_hip_kernel():
    on = {"fuse_rope_kvcache": True}
    d = resolve_fusion("fuse_rope_kvcache", simulated_setup("gfx942", flags=on))
    assert d.enabled and d.route == "aiter" and d.implementation == "vllm", d
    d = resolve_fusion("fuse_rope_kvcache", simulated_setup("gfx942", flags=on, has_aiter=False))
    assert d.enabled and d.route == "vllm_fusion" and "HIP kernel" in d.reason, d
    d = resolve_fusion("fuse_rope_kvcache", simulated_setup("gfx90a", flags=on))
    assert d.enabled and d.route == "vllm_fusion", d


def test_act_padding_runs_the_package_kernel_beyond_vllms_rocm_predicate():
    # vLLM 0.26: ROCm, AITER norm priority and hidden size 2880 only. The package: any hidden
    # size, CUDA too, no AITER needed; the reason cites the H100 measurement.
    for platform in ("sm90", "gfx942"):
        d = resolve_fusion("fuse_act_padding", simulated_setup(
            platform, level=1, hidden_size=4096, has_aiter=False))
        assert d.enabled and d.implementation == "vllm_fusion" and d.status == "on"
        assert "2026-11-27-h100-norm-pad.md" in d.reason
    no_kernels = resolve_fusion("fuse_act_padding", simulated_setup("sm90", kernels_loaded=False))
    assert not no_kernels.enabled and "kernels not loaded" in no_kernels.reason
    assert load_matrix()["fuse_act_padding"].winning_schemes("sm90") == SCHEMES


def test_package_options_in_the_decision():
    fp8_static = dict(quant="fp8-static")
    assert resolve_fusion("fuse_norm_quant", simulated_setup("sm90", **fp8_static)).status == "idle"
    forced = resolve_fusion("fuse_norm_quant",
                            simulated_setup("sm90", force_schemes=True, **fp8_static))
    assert forced.status == "on" and forced.schemes == ("fp8-static", "fp8-per-token", "fp8-group")
    chosen = resolve_fusion("fuse_norm_quant", simulated_setup(
        "sm90", scheme_overrides={"fuse_norm_quant": ("fp8-static",)}, **fp8_static))
    assert chosen.status == "on" and chosen.schemes == ("fp8-static",)
    off = resolve_fusion("fuse_norm_quant", simulated_setup("sm90", package_enabled=False))
    assert not off.enabled
    vllms = resolve_fusion("fuse_norm_quant", simulated_setup(
        "sm90", package_enabled=False, flags={"fuse_norm_quant": True}))
    assert vllms.enabled and vllms.implementation == "vllm"
    no_kernels = resolve_fusion("fuse_norm_quant", simulated_setup("sm90", kernels_loaded=False))
    assert not no_kernels.enabled and "kernels not loaded" in no_kernels.reason


@pytest.mark.parametrize("options, message", [
    ({"schemes": {"fuse_norm_quant": ["fp8-bogus"]}},
     'additional_config["vllm_fusion"]["schemes"]["fuse_norm_quant"] must be a list of scheme '
     "families from fp8-static, fp8-per-token, fp8-group"),
    ({"schemes": {"fuse_gemm_comms": []}},
     "unknown fusion 'fuse_gemm_comms' in additional_config[\"vllm_fusion\"][\"schemes\"]; "
     "allowed: enable_sp, fuse_act_padding, fuse_allreduce_rms, fuse_norm_quant, "
     "fuse_act_quant, fuse_rope_kvcache, fuse_attn_quant, enable_qk_norm_rope_fusion"),
    ({"schemes": ["fp8-group"]},
     'additional_config["vllm_fusion"]["schemes"] must be object, got'),
    ({"token_range": {"fuse_act_quant": [0, 10]}},
     'additional_config["vllm_fusion"]["token_range"]["fuse_act_quant"] must be [min, max]'),
    ({"token_range": {"fuse_act_quant": 256}}, "1 <= min <= max; got 256"),
    ({"tokens": {}}, "allowed keys: enabled (bool), force_schemes (bool), schemes (object), "
                     "token_range (object)"),
])
def test_bad_options_name_the_key_and_the_allowed_values(options, message):
    from vllm_fusion.config import FusionConfigError, parse_options

    with pytest.raises(FusionConfigError) as excinfo:
        parse_options({"vllm_fusion": options})
    assert message in str(excinfo.value)


def test_good_options_parse():
    from vllm_fusion.config import parse_options

    options = parse_options({"vllm_fusion": {"schemes": {"fuse_norm_quant": ["fp8-static"]},
                                             "token_range": {"fuse_act_quant": [1, 256]}}})
    assert options["schemes"] == {"fuse_norm_quant": ["fp8-static"]}
    assert options["token_range"] == {"fuse_act_quant": [1, 256]}


def test_docs_matrix_md_matches_the_data():
    from pathlib import Path

    from vllm_fusion.matrix_doc import render_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "matrix.md"
    assert doc.read_text() == render_markdown(), (
        "docs/matrix.md is stale: python -m vllm_fusion.cli matrix --markdown > docs/matrix.md")


def test_nvfp4_model_keeps_vllms_silu_nvfp4_fusion():
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    decision = resolve_fusion("fuse_act_quant", simulated_setup("sm100", quant="nvfp4", level=2))
    assert decision.enabled and decision.implementation == "vllm"
    assert "vLLM's own pass" in decision.reason
    # FP8 models on the same card still get the package's pass.
    fp8 = resolve_fusion("fuse_act_quant", simulated_setup("sm100", quant="fp8-group", level=2))
    assert fp8.implementation == "vllm_fusion"


def test_nvfp4_kernels_run_only_when_selected_on_sm100():
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    def decide(flag, platform="sm100", **kwargs):
        return resolve_fusion(flag, simulated_setup(platform, quant="nvfp4", level=2, **kwargs))

    # Compiled, never measured: RMSNorm+NVFP4 idles by default, SiLU+NVFP4 stays with vLLM.
    norm = decide("fuse_norm_quant")
    assert (norm.status, norm.implementation) == ("idle", "vllm_fusion")
    assert "nvfp4" not in norm.schemes and "force_schemes" in norm.reason
    for options in ({"force_schemes": True},
                    {"scheme_overrides": {"fuse_norm_quant": ["nvfp4"],
                                          "fuse_act_quant": ["nvfp4"]}}):
        for flag in ("fuse_norm_quant", "fuse_act_quant"):
            d = decide(flag, **options)
            assert (d.status, d.implementation) == ("on", "vllm_fusion"), (flag, options)
            assert "nvfp4" in d.schemes
    # Elsewhere the package has no NVFP4 kernel, forced or not.
    selected = {"scheme_overrides": {"fuse_norm_quant": ["nvfp4"], "fuse_act_quant": ["nvfp4"]}}
    for platform, options in itertools.product(("sm90", "sm120"),
                                               ({"force_schemes": True}, selected)):
        norm = decide("fuse_norm_quant", platform, **options)
        assert norm.status == "idle" and "nvfp4" not in norm.schemes, (platform, options)
        assert decide("fuse_act_quant", platform, **options).implementation == "vllm"
