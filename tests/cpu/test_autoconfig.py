"""The matrix as vLLM's optimization-level default, and its veto in the workers."""

from __future__ import annotations

import logging

import pytest

from tests.cpu.compile_harness import configured_pass_manager, make_vllm_config, pass_key
from tests.cpu.fake_platform import simulated_capability
from vllm_fusion.matrix import load_matrix, platform_id


@pytest.fixture
def plugin(kernels):
    from vllm_fusion.passes.pass_manager_hook import (
        install_level_defaults,
        install_pass_config_hook,
        install_pass_manager_hook,
    )

    install_pass_manager_hook()
    install_level_defaults()
    install_pass_config_hook()


def flags(config) -> tuple[bool, bool]:
    pc = config.compilation_config.pass_config
    return pc.fuse_norm_quant, pc.fuse_act_quant


def test_matrix_covers_the_implemented_fusions():
    from vllm_fusion.passes.registry import FUSIONS

    implemented = {f.flag for f in FUSIONS if f.package_pass}
    assert implemented <= set(load_matrix())
    for capability in load_matrix().values():
        assert capability.unsupported and capability.level in (0, 1, 2, 3)


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), "sm90"), ((8, 9), "sm89"), ((8, 0), "sm80"), ((10, 0), "sm100"), ((12, 0), "sm120"),
])
def test_platform_id(capability, expected):
    with simulated_capability(*capability):
        assert platform_id() == expected


@pytest.mark.parametrize("level, expected", [(0, (False, False)), (1, (True, True)),
                                             (2, (True, True)), (3, (True, True))])
def test_levels_turn_fusions_on_where_supported(plugin, level, expected):
    config = make_vllm_config(optimization_level=level)
    assert flags(config) == expected


def test_vllm_alone_keeps_them_off_at_O2():
    # Without the plugin, vLLM 0.26 leaves both off unless custom ops are on.
    assert flags(make_vllm_config(optimization_level=2)) == (False, False)


def test_unsupported_platform_stays_off_by_default(plugin):
    with simulated_capability(8, 0):
        assert flags(make_vllm_config(optimization_level=2)) == (False, False)


def test_explicit_false_wins(plugin):
    config = make_vllm_config(optimization_level=2, pass_config={"fuse_norm_quant": False})
    assert flags(config) == (False, True)


def test_disabled_package_leaves_vllm_defaults(plugin):
    config = make_vllm_config(optimization_level=2,
                              additional_config={"vllm_fusion": {"enabled": False}})
    assert flags(config) == (False, False)


def test_o2_on_sm90_has_the_package_passes_in_vllms_list(plugin):
    from vllm.config import set_current_vllm_config

    config = make_vllm_config(optimization_level=2)
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
    assert [pass_key(p) for p in manager.passes] == [
        "vllm:NoOpEliminationPass", "vllm_fusion:RMSNormPadFusionPass",
        "vllm_fusion:RMSNormQuantFusionPass", "vllm_fusion:ActivationQuantFusionPass"]


def test_explicit_act_padding_survives_vllms_rocm_only_gate(plugin):
    # vLLM 0.26's PassConfig turns fuse_act_padding off off-ROCm; the package runs it on CUDA.
    from vllm.config import set_current_vllm_config

    config = make_vllm_config(optimization_level=1, pass_config={"fuse_act_padding": True})
    assert config.compilation_config.pass_config.fuse_act_padding is True
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
    assert "vllm_fusion:RMSNormPadFusionPass" in [pass_key(p) for p in manager.passes]


def test_explicit_true_on_unsupported_platform_is_vetoed_with_warning(plugin, caplog):
    from vllm.config import set_current_vllm_config

    logging.getLogger("vllm").propagate = True
    with simulated_capability(8, 0), caplog.at_level(logging.WARNING, logger="vllm"):
        config = make_vllm_config(optimization_level=2, pass_config={"fuse_norm_quant": True})
        with set_current_vllm_config(config):
            manager = configured_pass_manager(config)
    keys = [pass_key(p) for p in manager.passes]
    assert not any("RMSNormQuantFusionPass" in k for k in keys)
    assert any("fuse_norm_quant is turned off on sm80: FP8 activation quantization"
               in r.getMessage() for r in caplog.records)
    # The flag itself is restored: vLLM's hash still sees what the user asked for.
    assert config.compilation_config.pass_config.fuse_norm_quant is True
