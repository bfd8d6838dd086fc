"""The resolver's decisions are what vLLM does: built VllmConfigs (a handful; the
cell-by-cell table is in test_resolver.py) and the post-grad pass list."""

from __future__ import annotations

import pytest

from tests.cpu.compile_harness import configured_pass_manager, make_vllm_config, pass_key
from tests.cpu.fake_platform import simulated_capability
from vllm_fusion.passes.registry import FUSION_FLAGS
from vllm_fusion.resolver import Setup, resolve_setup

# The post-grad pass of each fusion when it runs on CUDA, per implementation.
PASS = {
    "fuse_act_padding": "vllm_fusion:RMSNormPadFusionPass",
    "fuse_norm_quant": "vllm_fusion:RMSNormQuantFusionPass",
    "fuse_act_quant": "vllm_fusion:ActivationQuantFusionPass",
}


@pytest.fixture
def plugin(kernels):
    from vllm_fusion.passes.pass_manager_hook import install_level_defaults, install_pass_manager_hook

    install_pass_manager_hook()
    install_level_defaults()


def decisions_for(config):
    # The user's flags only (none here): what the level defaults should give.
    return resolve_setup(Setup.from_vllm_config(config, flags={}))


@pytest.mark.parametrize("capability, level", [((9, 0), 2), ((9, 0), 1), ((8, 0), 2),
                                               ((10, 0), 3), ((9, 0), 0)])
def test_vllm_flags_are_the_resolvers_decisions(plugin, capability, level):
    with simulated_capability(*capability):
        config = make_vllm_config(optimization_level=level)
        decisions = decisions_for(config)
    from vllm_fusion import compat

    # vLLM 0.33 keeps no SP flags: they come from additional_config (unset here, so off).
    values = compat.fusion_flag_values(config, FUSION_FLAGS)
    for flag in FUSION_FLAGS:
        assert bool(values[flag]) == decisions[flag].enabled, (flag, decisions[flag])


def test_o2_on_sm90_pass_list_is_what_the_matrix_says(plugin):
    from vllm.config import set_current_vllm_config

    config = make_vllm_config(optimization_level=2)
    setup = Setup.from_vllm_config(config, flags={})
    assert (setup.platform, setup.level, setup.tp, setup.quant) == ("sm90", 2, 1, "unquantized")
    decisions = resolve_setup(setup)
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
    expected = ["vllm:NoOpEliminationPass"] + [
        PASS[flag] for flag, d in decisions.items() if d.enabled]
    assert [pass_key(p) for p in manager.passes] == expected


def test_additional_config_overrides_reach_the_settings(plugin):
    from vllm.config import set_current_vllm_config

    from vllm_fusion.config import resolve

    config = make_vllm_config(optimization_level=2, additional_config={"vllm_fusion": {
        "schemes": {"fuse_norm_quant": ["fp8-static"]},
        "token_range": {"fuse_act_quant": [1, 256]}}})
    with set_current_vllm_config(config):
        settings = resolve(config)
    assert settings.schemes["fuse_norm_quant"] == ("fp8-static",)
    assert settings.schemes["fuse_act_quant"] == ("fp8-per-token", "fp8-group")
    assert settings.token_ranges == {"fuse_act_quant": (1, 256)}


def test_quant_scheme_of_an_fp8_model():
    config = make_vllm_config(quantization_config={"quant_method": "fp8",
                                                   "activation_scheme": "static"})
    assert Setup.from_vllm_config(config).quant == "fp8-static"
