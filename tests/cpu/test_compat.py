"""vllm_fusion.compat: the installed vLLM's branch for real, the other one with fakes."""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from vllm_fusion import compat


def test_installed_release_is_one_of_the_supported():
    from vllm_fusion.version import SUPPORTED_VLLM

    assert compat.installed_vllm_version() in SUPPORTED_VLLM
    assert compat.release().version == compat.installed_vllm_version()


@pytest.mark.parametrize("version, expected", [
    ("0.26.0", compat.VLLM_0_26), ("0.26.1", compat.VLLM_0_26),
    ("0.33.0", compat.VLLM_0_33), ("0.34.0", compat.VLLM_0_33), (None, compat.VLLM_0_26)])
def test_release_for_version(version, expected):
    assert compat.release_for(version) is expected


def test_the_release_table_matches_the_installed_pass_config():
    """The SP settings are PassConfig fields exactly where the release says so."""
    fields = compat.pass_config_fields()
    rel = compat.release()
    for name in compat.SP_SETTINGS:
        assert (name in fields) is rel.in_pass_config(name), name
    assert {"fuse_norm_quant", "fuse_act_quant", "fuse_act_padding"} <= fields


def test_the_release_table_matches_the_installed_pass_classes():
    import importlib.util

    has_sp = importlib.util.find_spec(
        "vllm.compilation.passes.fusion.sequence_parallelism") is not None
    has_canon = importlib.util.find_spec(
        "vllm.compilation.passes.fusion.add_rms_fusion") is not None
    rel = compat.release()
    assert rel.has_vllm_pass("enable_sp") is has_sp
    assert rel.has_vllm_pass("fuse_gemm_comms") is has_sp
    assert bool(rel.canonicalization_passes) is has_canon
    if has_canon:
        from vllm.compilation.passes.fusion import add_rms_fusion

        assert all(hasattr(add_rms_fusion, name) for name in rel.canonicalization_passes)


def _config(pass_config, additional=None, transformers=False):
    model = SimpleNamespace(using_transformers_backend=lambda: transformers)
    return SimpleNamespace(compilation_config=SimpleNamespace(pass_config=pass_config),
                           additional_config=additional or {}, model_config=model)


@pytest.mark.parametrize("rel", [compat.VLLM_0_26, compat.VLLM_0_33], ids=["0.26", "0.33"])
def test_sp_settings_come_from_the_releases_place(monkeypatch, rel):
    monkeypatch.setattr(compat, "release", lambda: rel)
    pass_config = SimpleNamespace(enable_sp=True, fuse_gemm_comms=None, sp_min_token_num=64,
                                  fuse_norm_quant=False)
    config = _config(pass_config, {"vllm_fusion": {"enable_sp": False, "sp_min_token_num": 8}})
    got = compat.fusion_flag_values(config, ("enable_sp", "fuse_gemm_comms", "fuse_norm_quant"),
                                    {"enable_sp": False, "fuse_gemm_comms": None,
                                     "sp_min_token_num": 8})
    if rel is compat.VLLM_0_26:
        assert got == {"enable_sp": True, "fuse_gemm_comms": None, "fuse_norm_quant": False}
        assert compat.read_setting(config, "sp_min_token_num", {}) == 64
        assert compat.setting_source("enable_sp") == "pass_config"
    else:
        assert got == {"enable_sp": False, "fuse_gemm_comms": None, "fuse_norm_quant": False}
        assert compat.read_setting(config, "sp_min_token_num", {"sp_min_token_num": 8}) == 8
        assert compat.setting_source("enable_sp") == "additional_config"
    assert compat.setting_source("fuse_norm_quant") == "pass_config"


@pytest.mark.parametrize("rel", [compat.VLLM_0_26, compat.VLLM_0_33], ids=["0.26", "0.33"])
def test_sp_options_are_validated_per_release(monkeypatch, rel):
    from vllm_fusion.config import FusionConfigError, parse_options

    monkeypatch.setattr(compat, "release", lambda: rel)
    if rel is compat.VLLM_0_26:
        with pytest.raises(FusionConfigError, match=r"enable_sp is vLLM's own setting there "
                                                     r"\(-cc.pass_config.enable_sp=...\)"):
            parse_options({"vllm_fusion": {"enable_sp": True}})
        assert "enable_sp" not in parse_options({})
        return
    options = parse_options({"vllm_fusion": {"enable_sp": True, "sp_min_token_num": 512}})
    assert options["enable_sp"] is True and options["sp_min_token_num"] == 512
    assert options["fuse_gemm_comms"] is None
    for bad, message in [({"enable_sp": 1}, r'\["enable_sp"\] must be bool'),
                         ({"sp_min_token_num": 0}, "must be an integer >= 1"),
                         ({"sp_min_token_num": True}, r"must be int"),
                         ({"sp_min_tokens": 3}, r"unknown key.*sp_min_token_num \(int\)")]:
        with pytest.raises(FusionConfigError, match=message):
            parse_options({"vllm_fusion": bad})


def test_resolver_turns_sp_off_on_033_with_the_reason():
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    for version, enabled in (("0.26.0", True), ("0.33.0", False)):
        setup = simulated_setup("sm90", tp=2, flags={"enable_sp": True}, vllm=version,
                                hidden_size=8192)
        decision = resolve_fusion("enable_sp", setup)
        assert decision.enabled is enabled, decision
    assert "vLLM 0.33.0 has no enable_sp pass" in decision.warning
    off = resolve_fusion("enable_sp", simulated_setup("sm90", tp=2, flags={"enable_sp": False},
                                                      vllm="0.33.0"))
    assert "additional_config vllm_fusion.enable_sp=false" in off.reason


def test_sp_min_token_num_lifts_the_hidden_size_threshold():
    from vllm_fusion.resolver import resolve_fusion, simulated_setup

    small = dict(tp=2, flags={"enable_sp": True}, vllm="0.26.0", hidden_size=4096)
    assert not resolve_fusion("enable_sp", simulated_setup("sm90", **small)).enabled
    assert resolve_fusion("enable_sp", simulated_setup("sm90", sp_min_token_num=256,
                                                       **small)).enabled


@pytest.mark.parametrize("rel, flags, transformers, wanted", [
    (compat.VLLM_0_26, {"fuse_norm_quant": True}, True, False),
    (compat.VLLM_0_33, {"fuse_norm_quant": True}, True, True),
    (compat.VLLM_0_33, {"fuse_act_padding": True}, True, True),
    (compat.VLLM_0_33, {"fuse_norm_quant": True}, False, False),
    (compat.VLLM_0_33, {"fuse_act_quant": True}, True, False),
], ids=["0.26", "0.33-norm-quant", "0.33-padding", "0.33-not-transformers", "0.33-act-only"])
def test_norm_canonicalization_is_wanted_as_vllm_decides(monkeypatch, rel, flags, transformers,
                                                         wanted):
    monkeypatch.setattr(compat, "release", lambda: rel)
    pass_config = SimpleNamespace(**{f: False for f in compat.NORM_CANONICALIZATION_FLAGS},
                                  fuse_act_quant=False)
    for flag, value in flags.items():
        setattr(pass_config, flag, value)
    assert compat.norm_canonicalization_wanted(_config(pass_config, transformers=transformers)) \
        is wanted


def test_restore_norm_canonicalization_puts_passes_where_vllm_runs_them(monkeypatch):
    """With fakes for 0.33's passes: AddRMSNorm right after no-op elimination, the reshape
    pass after all-reduce fusion and before the norm+quant fusion."""
    from vllm_fusion.passes import pass_manager_hook as hook
    from vllm.compilation.passes import fusion

    made = []

    def fake(name):
        cls = type(name, (), {"__init__": lambda self, config: made.append(name)})
        return cls

    fake_module = SimpleNamespace(AddRMSNormFusionPass=fake("AddRMSNormFusionPass"),
                                  RMSNormReshapeFusionPass=fake("RMSNormReshapeFusionPass"))
    monkeypatch.setattr(fusion, "add_rms_fusion", fake_module, raising=False)
    import sys

    monkeypatch.setitem(sys.modules, "vllm.compilation.passes.fusion.add_rms_fusion", fake_module)
    monkeypatch.setattr(compat, "release", lambda: compat.VLLM_0_33)
    named = {n: type(n, (), {})() for n in ("NoOpEliminationPass", "AllReduceFusionPass",
                                            "AttnQuantFusionPass")}
    passes = list(named.values())
    from tests.cpu.compile_harness import make_vllm_config

    config = make_vllm_config()
    result = compat.restore_norm_canonicalization(passes, config, True, hook._rank_of)
    assert [type(p).__name__ for p in result] == [
        "NoOpEliminationPass", "AddRMSNormFusionPass", "AllReduceFusionPass",
        "RMSNormReshapeFusionPass", "AttnQuantFusionPass"]
    assert made == ["AddRMSNormFusionPass", "RMSNormReshapeFusionPass"]
    # Not wanted, or already there: unchanged.
    assert compat.restore_norm_canonicalization(passes, config, False, hook._rank_of) == passes
    assert compat.restore_norm_canonicalization(result, config, True, hook._rank_of) == result
    # The package's norm passes are placed after them.
    from vllm_fusion.passes.registry import by_flag

    ours = SimpleNamespace(flag="fuse_norm_quant")
    placed = hook.place_pass(result, by_flag("fuse_norm_quant"), ours)
    assert placed.index(ours) == 4


@pytest.mark.skipif(not compat.release().canonicalization_passes,
                    reason="vLLM 0.26 has no norm canonicalization passes")
def test_package_norm_quant_keeps_vllms_canonicalization_for_transformers_models(
        monkeypatch, kernels):
    """Real 0.33 configure: replacing vLLM's norm+quant pass must not drop AddRMSNorm."""
    from vllm.config import ModelConfig

    from tests.cpu.compile_harness import configured_pass_manager, make_vllm_config, pass_key
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_pass_manager_hook()
    monkeypatch.setattr(ModelConfig, "using_transformers_backend", lambda self: True)
    config = make_vllm_config(custom_ops=["+quant_fp8"], pass_config={"fuse_norm_quant": True})
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(config):
        names = [pass_key(p) for p in configured_pass_manager(config).passes]
    # Later passes (e.g. fuse_act_quant, on by the package's level defaults) may follow.
    assert names[:4] == ["vllm:NoOpEliminationPass", "vllm:AddRMSNormFusionPass",
                         "vllm:RMSNormReshapeFusionPass", "vllm_fusion:RMSNormQuantFusionPass"]


def _graph_with_auto_func():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    op = torch.ops.aten.relu.default
    at = graph.call_function(auto_functionalized, (op,), {"input": x})
    first = graph.call_function(operator.getitem, (at, 1))
    graph.output(first)
    return graph, op, at, first


def test_vendored_fx_utils():
    graph, op, at, first = _graph_with_auto_func()
    assert compat.is_auto_func(at, op)
    assert not compat.is_auto_func(at, torch.ops.aten.gelu.default)
    assert compat.find_getitem(at, 1) is first
    assert compat.find_getitem_maybe(at, 0) is None
    with pytest.raises(ValueError, match="no getitem 0"):
        compat.find_getitem(at, 0)
    assert compat.get_only_user(at) is first
    other = torch.fx.Graph()
    x = other.placeholder("x")
    other.output((other.call_function(torch.ops.aten.neg.default, (x,)),
                  other.call_function(torch.ops.aten.abs.default, (x,))))
    with pytest.raises(ValueError, match="2 users"):
        compat.get_only_user(x)
