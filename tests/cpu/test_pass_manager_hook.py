"""The configure hook: which passes end up in vLLM's list, where, and how the
cache keys react to the package version and settings."""

from __future__ import annotations

import pytest
import torch

from tests.cpu.compile_harness import configured_pass_manager, make_vllm_config, pass_key
from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook, place_pass
from vllm_fusion.passes.registry import by_flag

FUSIONS_ON = {"fuse_norm_quant": True, "fuse_act_quant": True}


@pytest.fixture
def hooked():
    install_pass_manager_hook()


def manager_for(**kwargs):
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import Range

    config = make_vllm_config(**kwargs)
    with set_current_vllm_config(config), pass_context(Range(start=1, end=8192)):
        manager = configured_pass_manager(config)
        return manager, manager.uuid()


def named(name: str) -> object:
    return type(name, (), {})()


def test_place_pass_replaces_every_vllm_instance_in_place():
    passes = [named("NoOpEliminationPass"), named("RocmAiterRMSNormQuantFusionPass"),
              named("RMSNormQuantFusionPass"), named("ActivationQuantFusionPass")]
    ours = named("Ours")
    result = place_pass(passes, by_flag("fuse_norm_quant"), ours)
    assert [type(p).__name__ for p in result] == [
        "NoOpEliminationPass", "Ours", "ActivationQuantFusionPass"]


def test_place_pass_inserts_at_vllms_position_when_vllm_has_none():
    passes = [named("NoOpEliminationPass"), named("AllReduceFusionPass"),
              named("AttnQuantFusionPass")]
    result = place_pass(passes, by_flag("fuse_act_quant"), named("Ours"))
    assert [type(p).__name__ for p in result] == [
        "NoOpEliminationPass", "AllReduceFusionPass", "Ours", "AttnQuantFusionPass"]
    result = place_pass([named("SequenceParallelismPass")], by_flag("fuse_norm_quant"),
                        named("Ours"))
    assert [type(p).__name__ for p in result] == ["SequenceParallelismPass", "Ours"]


def test_without_hook_vllm_keeps_its_passes():
    manager, _ = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    assert [pass_key(p) for p in manager.passes] == [
        "vllm:NoOpEliminationPass", "vllm:RMSNormQuantFusionPass",
        "vllm:ActivationQuantFusionPass"]


def test_hook_swaps_in_package_passes_in_vllms_order(hooked):
    manager, _ = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    assert [pass_key(p) for p in manager.passes] == [
        "vllm:NoOpEliminationPass", "vllm_fusion:RMSNormQuantFusionPass",
        "vllm_fusion:ActivationQuantFusionPass"]


def test_disabled_by_additional_config_keeps_vllm_passes(hooked):
    manager, _ = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON,
                             additional_config={"vllm_fusion": {"enabled": False}})
    assert "vllm:RMSNormQuantFusionPass" in [pass_key(p) for p in manager.passes]


def test_uuid_changes_with_package_version(hooked, monkeypatch):
    import vllm_fusion.passes.base as base

    _, before = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    _, same = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    monkeypatch.setattr(base, "__version__", "999.0.0")
    _, after = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    assert before == same
    assert before != after


def test_uuid_changes_with_kernel_library(hooked, monkeypatch):
    from vllm_fusion import _kernels

    _, before = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    real = _kernels.load()
    monkeypatch.setattr(_kernels, "load", lambda: _kernels.KernelStatus(
        real.loaded, real.reason, "0" * 64, real.path))
    _, after = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    assert before != after


def test_uuid_changes_with_settings(hooked):
    _, both = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    _, one = manager_for(custom_ops=["+quant_fp8"],
                         pass_config={"fuse_norm_quant": True, "fuse_act_quant": False})
    assert both != one


def test_compile_factors_carry_version_kernels_and_settings(monkeypatch):
    import vllm.envs as envs
    from vllm.config import set_current_vllm_config

    from vllm_fusion.passes import pass_manager_hook as hook

    hook.install_compile_factors_hook()
    hook.install_compile_factors_hook()  # idempotent: wrapped once
    config_a = make_vllm_config(pass_config=FUSIONS_ON)
    config_b = make_vllm_config(pass_config={"fuse_norm_quant": True})
    with set_current_vllm_config(config_a):
        a = envs.compile_factors()
    with set_current_vllm_config(config_b):
        b = envs.compile_factors()
    assert a["VLLM_FUSION_SETTINGS"] != b["VLLM_FUSION_SETTINGS"]
    monkeypatch.setattr(hook, "__version__", "999.0.0")
    with set_current_vllm_config(config_a):
        c = envs.compile_factors()
    assert c["VLLM_FUSION_VERSION"] == "999.0.0" != a["VLLM_FUSION_VERSION"]


def test_failing_pass_setup_warns_and_keeps_vllm_pass(hooked, monkeypatch, vllm_logs):
    from vllm_fusion.passes import rms_quant_fusion

    def broken(self, config, settings):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(rms_quant_fusion.RMSNormQuantFusionPass, "__init__", broken)
    manager, _ = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    keys = [pass_key(p) for p in manager.passes]
    assert "vllm:RMSNormQuantFusionPass" in keys
    assert "vllm_fusion:ActivationQuantFusionPass" in keys
    assert any("fuse_norm_quant could not be set up (RuntimeError: injected fault)"
               in r.getMessage() for r in vllm_logs.records)


def test_missing_kernels_keep_vllm_passes(hooked, monkeypatch, vllm_logs):
    from vllm_fusion import _kernels

    monkeypatch.setattr(_kernels, "load", lambda: _kernels.KernelStatus(
        False, "built with VLLM_FUSION_TARGET_DEVICE=empty", "none"))
    manager, _ = manager_for(custom_ops=["+quant_fp8"], pass_config=FUSIONS_ON)
    assert [pass_key(p) for p in manager.passes] == [
        "vllm:NoOpEliminationPass", "vllm:RMSNormQuantFusionPass",
        "vllm:ActivationQuantFusionPass"]
    assert any("VLLM_FUSION_TARGET_DEVICE=empty" in r.getMessage() for r in vllm_logs.records)


@pytest.mark.parametrize("options, message", [
    ({"enable": True}, "unknown key(s) 'enable' in additional_config[\"vllm_fusion\"]; "
                       "allowed keys: enabled (bool), force_schemes (bool)"),
    ({"enabled": 1}, "additional_config[\"vllm_fusion\"][\"enabled\"] must be bool, got 1"),
    ("yes", "additional_config[\"vllm_fusion\"] must be a JSON object, got str"),
])
def test_bad_additional_config_fails_with_the_setting_named(hooked, options, message):
    from vllm_fusion.config import FusionConfigError

    with pytest.raises(FusionConfigError) as excinfo:
        manager_for(pass_config=FUSIONS_ON, additional_config={"vllm_fusion": options})
    assert message in str(excinfo.value)


def test_pass_uuid_is_stable_across_instances(hooked):
    a, _ = manager_for(dtype=torch.float16, pass_config=FUSIONS_ON)
    b, _ = manager_for(dtype=torch.float16, pass_config=FUSIONS_ON)
    assert [p.uuid() for p in a.passes] == [p.uuid() for p in b.passes]


def test_companions_follow_the_package_pass(monkeypatch):
    from vllm_fusion.passes import attn_quant_fusion
    from vllm_fusion.passes.pass_manager_hook import add_companions

    monkeypatch.setattr(attn_quant_fusion, "vllm_mla_passes",
                        lambda config: [named("MLAAttnQuantFusionPass")])
    ours = named("Ours")
    passes = [named("NoOpEliminationPass"), ours, named("QKNormRoPEFusionPass")]
    result = add_companions(passes, by_flag("fuse_attn_quant"), ours, make_vllm_config())
    assert [type(p).__name__ for p in result] == [
        "NoOpEliminationPass", "Ours", "MLAAttnQuantFusionPass", "QKNormRoPEFusionPass"]
    # A fusion without companions: unchanged.
    assert add_companions(passes, by_flag("fuse_norm_quant"), ours, make_vllm_config()) == passes
