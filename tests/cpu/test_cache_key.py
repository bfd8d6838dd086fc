"""vLLM's compile-cache key moves with the package, and a cached graph runs without
any pass: vLLM loads compiled graphs from its cache without running the post-grad
passes, so the key must change whenever the package would compile differently, and
the compiled code must need nothing that a pass would have set up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config

ROOT = Path(__file__).resolve().parents[2]
FUSIONS_ON = {"fuse_norm_quant": True, "fuse_act_quant": True}


@pytest.fixture(autouse=True)
def one_model_dir(monkeypatch):
    """Every config of a test names the same model directory, as a real deployment does."""
    from tests.cpu import compile_harness

    path = compile_harness.local_model_dir()
    monkeypatch.setattr(compile_harness, "local_model_dir", lambda **overrides: path)


@pytest.fixture(autouse=True)
def factors_hooked(kernels):
    from vllm_fusion.passes.pass_manager_hook import install_compile_factors_hook

    install_compile_factors_hook()


def cache_key(config) -> tuple[str, str]:
    """(env hash, AOT cache key) exactly as vLLM 0.26 computes them for ``config``."""
    import hashlib

    import vllm.envs as envs
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import hash_factors

    with set_current_vllm_config(config):
        env_hash = hash_factors(envs.compile_factors())  # VllmBackend.__call__
        factors = aot_compile_hash_factors(config)  # the AOT artifact's directory
    return env_hash, hashlib.sha256(str(factors).encode()).hexdigest()


def test_key_is_stable_for_the_same_setup():
    assert cache_key(make_vllm_config(pass_config=FUSIONS_ON)) == cache_key(
        make_vllm_config(pass_config=FUSIONS_ON))


def test_key_changes_with_package_version(monkeypatch):
    from vllm_fusion.passes import pass_manager_hook

    config = make_vllm_config(pass_config=FUSIONS_ON)
    before = cache_key(config)
    monkeypatch.setattr(pass_manager_hook, "__version__", "999.0.0")
    after = cache_key(config)
    assert before[0] != after[0] and before[1] != after[1]


def test_key_changes_with_kernel_library(monkeypatch):
    from vllm_fusion import _kernels

    config = make_vllm_config(pass_config=FUSIONS_ON)
    before = cache_key(config)
    real = _kernels.load()
    rebuilt = _kernels.KernelStatus(real.loaded, real.reason, "f" * 64, real.path)
    monkeypatch.setattr(_kernels, "load", lambda: rebuilt)
    after = cache_key(config)
    assert before[0] != after[0] and before[1] != after[1]


@pytest.mark.parametrize("change", [
    {"pass_config": {"fuse_norm_quant": True, "fuse_act_quant": False}},
    {"additional_config": {"vllm_fusion": {"token_range": {"fuse_act_quant": [1, 64]}}}},
    {"additional_config": {"vllm_fusion": {"enabled": False}}},
], ids=["flag", "token_range", "enabled"])
def test_key_changes_with_each_setting(change):
    base = {"pass_config": FUSIONS_ON}
    before = cache_key(make_vllm_config(**base))
    after = cache_key(make_vllm_config(**{**base, **change}))
    # The package's own factor moves, not only vLLM's config hash.
    assert before[0] != after[0] and before[1] != after[1]


# Arguments an op writes by design: vLLM's own paged KV cache, which the attention layer owns
# and a compiled graph gets from vLLM's forward context, never a buffer a pass prepares.
WRITES_VLLM_STATE = {"qk_norm_rope_kv_cache": ["key_cache", "value_cache"]}
# The all-reduce kernel advances its workspace's call counter. Graphs never call it: they call
# vllm_fusion::fused_all_reduce_rms_norm (below), which makes the workspace when first run.
WRITES_OWN_WORKSPACE = {"all_reduce_rms_norm": ["counter"]}


def test_ops_allocate_their_outputs():
    """No op takes a buffer that a pass would have to prepare (a workspace, an output): every
    argument is read-only, but vLLM's KV cache where an op writes it as vLLM's own kernels do,
    so a graph loaded from the cache needs only the library."""
    from vllm_fusion.ops import OPS

    for name in OPS:
        schema = getattr(torch.ops.vllm_fusion, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        allowed = WRITES_VLLM_STATE.get(name, WRITES_OWN_WORKSPACE.get(name, []))
        assert written == allowed, f"{name} writes into {written}"
        assert all(r.alias_info is None for r in schema.returns), name


def test_fused_all_reduce_graph_op_takes_no_workspace():
    import vllm_fusion.ops.fused_allreduce  # noqa: F401  (registers the op)

    schema = torch.ops.vllm_fusion.fused_all_reduce_rms_norm.default._schema
    assert [a.name for a in schema.arguments if a.alias_info] == []
    assert all(r.alias_info is None for r in schema.returns)


# A compiled graph as vLLM's cache holds it: generated code that calls the ops by name.
CACHED_PROCESS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.cpu.fake_platform import install_fake_cuda_platform, load_libcuda
    load_libcuda()
    install_fake_cuda_platform()
    import vllm.plugins
    vllm.plugins.load_general_plugins()  # what every vLLM process does at start
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tests.kernel_input_cases import VALID_CALLS
    ran, failed = [], {{}}
    with FakeTensorMode():
        for name, make_args in VALID_CALLS.items():
            try:
                out = eval(f"torch.ops.vllm_fusion.{{name}}.default")(*make_args("cuda"))
                ran.append(name)
            except Exception as e:
                failed[name] = type(e).__name__
    print("RESULT " + json.dumps({{
        "ran": ran, "failed": failed,
        "passes_imported": sorted(m for m in sys.modules if m.startswith("vllm_fusion.passes.")
                                  and m.endswith("_fusion")),
    }}))
""")


@pytest.mark.parametrize("plugins, expect_ran", [(None, True), ("", False)],
                         ids=["plugin-loaded", "VLLM_PLUGINS-empty"])
def test_cached_graph_runs_where_no_pass_was_built(plugins, expect_ran):
    from tests.kernel_input_cases import VALID_CALLS

    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, "-c", CACHED_PROCESS.format(root=str(ROOT))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["passes_imported"] == []  # no pass module, let alone a pass, was built
    if expect_ran:
        assert result["ran"] == list(VALID_CALLS) and result["failed"] == {}
    else:  # the library is what the cached code needs, and vLLM loads it through the plugin
        assert result["ran"] == [] and set(result["failed"]) == set(VALID_CALLS)
