"""A bad ``additional_config["vllm_fusion"]`` stops vLLM at startup, in the process that
parses the command line (before any engine or worker starts), at every optimization level,
with the setting named. The plugin is loaded by vLLM's own loader, as ``vllm serve`` does."""

from __future__ import annotations

import pytest

from tests.cpu.compile_harness import local_model_dir

UNKNOWN = ("unknown key(s) 'enable' in additional_config[\"vllm_fusion\"]; allowed keys: "
           "enabled (bool), force_schemes (bool), schemes (object), token_range (object)")


def engine_config(options, *, level: int, flags: dict | None = None):
    """What `vllm serve` does with its arguments: EngineArgs -> VllmConfig."""
    from vllm.engine.arg_utils import EngineArgs

    model = local_model_dir()
    args = EngineArgs(
        model=model, tokenizer=model, skip_tokenizer_init=True, load_format="dummy",
        optimization_level=level,
        compilation_config={"pass_config": flags or {}},
        additional_config={"vllm_fusion": options},
    )
    return args.create_engine_config()


@pytest.fixture(autouse=True)
def all_plugins(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)


@pytest.mark.parametrize("level, flags", [
    (0, None), (2, None), (2, {"fuse_norm_quant": True, "fuse_act_quant": False}),
], ids=["O0", "O2-defaults", "O2-explicit-flags"])
def test_unknown_option_stops_startup_at_every_level(level, flags):
    with pytest.raises(ValueError) as excinfo:
        engine_config({"enable": True}, level=level, flags=flags)
    assert UNKNOWN in str(excinfo.value)


@pytest.mark.parametrize("options, message", [
    ({"force_schemes": "yes"},
     'additional_config["vllm_fusion"]["force_schemes"] must be bool, got \'yes\''),
    ({"token_range": {"fuse_act_quant": [64, 1]}},
     'additional_config["vllm_fusion"]["token_range"]["fuse_act_quant"] must be [min, max] '
     "with integers 1 <= min <= max; got [64, 1]"),
    ({"schemes": {"fuse_norm_quant": ["nvfp4-bogus"]}},
     'additional_config["vllm_fusion"]["schemes"]["fuse_norm_quant"] must be a list of '
     "scheme families from"),
], ids=["wrong-type", "bad-range", "unknown-scheme"])
def test_bad_value_stops_startup_with_the_setting_named(options, message):
    with pytest.raises(ValueError) as excinfo:
        engine_config(options, level=0)
    assert message in str(excinfo.value)


def test_valid_options_start(kernels):
    config = engine_config({"enabled": True, "token_range": {"fuse_act_quant": [1, 512]}},
                           level=2)
    assert config.additional_config["vllm_fusion"]["token_range"] == {"fuse_act_quant": [1, 512]}


def test_without_the_plugin_vllm_does_not_check_the_options(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "")
    config = engine_config({"enable": True}, level=0)
    assert config.additional_config == {"vllm_fusion": {"enable": True}}
