"""The plugin in vLLM's process layouts: loaded once in every process, whether the
process is spawned (a fresh interpreter) or forked (inherits the parent's state),
through vLLM's own loader and VLLM_PLUGINS; and inert where vLLM is not in use."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_plugins_and_report(queue) -> None:
    """What every vLLM process does at start (API server, engine core, workers)."""
    from tests.cpu.fake_platform import install_fake_cuda_platform, load_libcuda

    load_libcuda()
    install_fake_cuda_platform()
    import vllm.plugins

    vllm.plugins.load_general_plugins()
    vllm.plugins.load_general_plugins()  # vLLM calls it from several places
    import vllm_fusion.plugin as plugin
    from vllm_fusion.passes import pass_manager_hook as hook

    queue.put({
        "pid": os.getpid(),
        "count": plugin.registration_count,
        "hooked": hook.is_pass_manager_hooked(),
    })


def run_children(method: str, envs: list[dict[str, str]]) -> list[dict]:
    """One child per entry of ``envs`` (environment changes), started with ``method``."""
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    children = []
    for changes in envs:
        saved = {key: os.environ.get(key) for key in changes}
        os.environ.update(changes)
        try:
            child = context.Process(target=load_plugins_and_report, args=(queue,))
            child.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        children.append(child)
    reports = [queue.get(timeout=600) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    return sorted(reports, key=lambda r: [c.pid for c in children].index(r["pid"]))


def test_spawned_processes_each_register_once_and_honour_vllm_plugins(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    worker, excluded = run_children("spawn", [{}, {"VLLM_PLUGINS": "some_other_plugin"}])
    assert worker["pid"] != excluded["pid"] != os.getpid()
    assert (worker["count"], worker["hooked"]) == (1, True)
    assert (excluded["count"], excluded["hooked"]) == (0, False)


@pytest.mark.parametrize("parent_loaded", [True, False], ids=["parent-loaded", "parent-bare"])
def test_forked_processes_register_once(monkeypatch, parent_loaded):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    import vllm.plugins

    import vllm_fusion.plugin as plugin

    if parent_loaded:  # vLLM's API server loads plugins, then forks the engine core
        vllm.plugins.load_general_plugins()
        assert plugin.registration_count == 1
    before = plugin.registration_count
    reports = run_children("fork", [{}, {}])
    assert [(r["count"], r["hooked"]) for r in reports] == [(1, True), (1, True)]
    assert plugin.registration_count == before  # the children's registration stays theirs


def test_importing_the_package_without_vllm_does_nothing():
    # A process that imports the package (or its ops) but never starts vLLM: no vLLM
    # import, no import hook, no pass-manager patch, no log line.
    probe = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import vllm_fusion, vllm_fusion.ops, vllm_fusion.ops.checks
        print("RESULT " + json.dumps({{
            "vllm": sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")),
            "finders": [type(f).__name__ for f in sys.meta_path
                        if type(f).__module__.startswith("vllm_fusion")],
            "plugin": "vllm_fusion.plugin" in sys.modules,
        }}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) == {"vllm": [], "finders": [], "plugin": False}
    assert "vllm_fusion" not in proc.stderr
