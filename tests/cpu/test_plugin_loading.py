"""The plugin loads through vLLM's real entry-point machinery, once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: the libcuda stub and simulated GPU first, then
# vLLM's own plugin loader, twice, as vLLM's processes do.
PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.cpu.fake_platform import install_fake_cuda_platform, load_libcuda
    load_libcuda()
    install_fake_cuda_platform()
    from vllm_fusion import compat
    compat.configure_vllm_logging()  # as vLLM's entry points do before loading plugins
    import vllm.plugins
    vllm.plugins.load_general_plugins()
    vllm.plugins.load_general_plugins()
    import vllm_fusion.plugin as plugin
    from vllm_fusion.passes import pass_manager_hook as hook
    import vllm.envs as envs
    hooked_before_import = hook.is_pass_manager_hooked()
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config import VllmConfig
    print("RESULT " + json.dumps({{
        "compile_ranges_wrapped": getattr(VllmConfig._set_compile_ranges, hook._WRAPPED, False),
        "count": plugin.registration_count,
        "hooked_before_import": hooked_before_import,
        "configure_wrapped": hook.is_pass_manager_hooked(),
        "factors": sorted(k for k in envs.compile_factors() if k.startswith("VLLM_FUSION")),
    }}))
    """
)


def run_probe(env_overrides: dict[str, str | None]) -> tuple[dict, str]:
    env = dict(os.environ)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), output


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("vllm_fusion") == "vllm_fusion.plugin:register"


def test_vllm_loads_plugin_once_and_installs_hooks():
    result, output = run_probe({"VLLM_PLUGINS": None})
    assert result["count"] == 1
    # The pass-manager wrap waits for vLLM to import its module, then applies.
    assert result["hooked_before_import"] is True
    assert result["configure_wrapped"] is True
    assert result["compile_ranges_wrapped"] is True  # fuse_allreduce_rms's size threshold
    assert result["factors"] == [
        "VLLM_FUSION_KERNELS", "VLLM_FUSION_SETTINGS", "VLLM_FUSION_VERSION",
    ]
    from vllm_fusion.version import __version__

    info = [l for l in output.splitlines() if f"vllm_fusion {__version__}:" in l]
    assert len(info) == 1, output[-2000:]
    assert "INFO" in info[0]
    assert ("fusions: enable_sp, fuse_act_padding, fuse_allreduce_rms, fuse_norm_quant, "
            "fuse_act_quant") in info[0]
    from vllm_fusion import compat

    # What vLLM itself still runs, and what no one has, with this vLLM.
    if compat.release() is compat.VLLM_0_26:
        tail = "vLLM's own pass kept for: fuse_gemm_comms; no pass in this vLLM: none"
    else:
        tail = "vLLM's own pass kept for: none; no pass in this vLLM: fuse_gemm_comms"
    assert info[0].endswith(tail), info[0]


@pytest.mark.parametrize(
    "allowlist, expected", [("vllm_fusion", 1), ("some_other_plugin", 0), ("", 0)]
)
def test_vllm_plugins_allowlist_is_honoured(allowlist, expected):
    result, _ = run_probe({"VLLM_PLUGINS": allowlist})
    assert result["count"] == expected
    assert result["configure_wrapped"] is bool(expected)


def test_register_is_idempotent_and_inherited_by_fork():
    import vllm_fusion.plugin as plugin

    plugin.register()
    plugin.register()
    assert plugin.registration_count == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: state is inherited, registering again does nothing
        plugin.register()
        os.write(write, str(plugin.registration_count).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"1"


def test_register_never_raises(monkeypatch):
    import vllm_fusion.plugin as plugin

    def broken():
        raise RuntimeError("injected failure")

    monkeypatch.setattr(plugin, "_register", broken)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()  # must not raise
    assert plugin._registered


def test_mismatched_vllm_version_warns_with_supported_range(monkeypatch, caplog):
    import logging

    import vllm

    import vllm_fusion.plugin as plugin

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    logging.getLogger("vllm").propagate = True
    with caplog.at_level(logging.WARNING, logger="vllm"):
        plugin._check_vllm_version()
    messages = [r.getMessage() for r in caplog.records]
    assert any("supports vLLM 0.26.0 / 0.33.0; found 0.99.0" in m for m in messages), messages
