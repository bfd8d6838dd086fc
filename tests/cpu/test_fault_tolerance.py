"""A fusion that raises while rewriting never stops vLLM: the graph it was
rewriting is put back exactly as it was (unfused), one warning names the
fusion and the error, and the other passes still run."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from tests.cpu.compile_harness import make_vllm_config, run_post_grad_passes
from tests.cpu.models import QuantizedDecoderStack

NORM_PASS = "vllm_fusion:RMSNormQuantFusionPass"
ACT_PASS = "vllm_fusion:ActivationQuantFusionPass"
FAULT = "injected rewrite fault"


pytestmark = pytest.mark.usefixtures("pass_hook")


@pytest.fixture
def warnings_logged(caplog):
    logging.getLogger("vllm").propagate = True
    with caplog.at_level(logging.WARNING, logger="vllm"):
        yield lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def compile_stack(*, fuse_norm_quant: bool = True):
    config = make_vllm_config(
        custom_ops=["+quant_fp8", "+silu_and_mul"],
        pass_config={"fuse_norm_quant": fuse_norm_quant, "fuse_act_quant": True},
        additional_config={"vllm_fusion": {"force_schemes": True}},
    )
    return run_post_grad_passes(
        lambda: QuantizedDecoderStack(256, 512, torch.bfloat16, 1e-6, "fp8-per-token"),
        lambda: [torch.empty(7, 256, dtype=torch.bfloat16)],
        config,
    )


def fail_from_call(n: int):
    """A wrapper that lets ``n - 1`` calls through, then raises on every later one."""
    calls = {"n": 0}

    def wrap(fn):
        @functools.wraps(fn)  # the matcher reads the replacement's signature
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= n:
                raise RuntimeError(FAULT)
            return fn(*args, **kwargs)

        return wrapper

    return wrap, calls


def rewrite_failures(messages: list[str]) -> list[str]:
    return [m for m in messages if "failed while rewriting" in m]


@pytest.mark.parametrize("fail_at", [1, 2], ids=["first-site", "after-one-site-fused"])
def test_fault_in_replacement_leaves_the_graph_unfused(monkeypatch, warnings_logged, fail_at):
    from vllm_fusion.passes.rms_quant_fusion import RMSNormQuantPattern

    unfused = compile_stack(fuse_norm_quant=False)
    wrap, calls = fail_from_call(fail_at)
    real = RMSNormQuantPattern.replacement
    monkeypatch.setattr(RMSNormQuantPattern, "replacement",
                        property(lambda self: wrap(real.fget(self))))

    result = compile_stack()  # compiles: the fault never reaches vLLM

    assert calls["n"] >= fail_at  # the fault fired, after (fail_at - 1) sites were rewritten
    assert result.matches[NORM_PASS] == 0
    assert result.matches[ACT_PASS] == 2  # the next pass still ran
    # Exactly the graph vLLM gets without this fusion: no half-rewritten site left.
    assert result.graph_after == unfused.graph_after
    assert result.count("vllm_fusion.fused_add_rms_norm_dynamic_fp8_quant.default") == 0
    failures = rewrite_failures(warnings_logged())
    assert failures == [
        "vllm_fusion: fuse_norm_quant (rmsnorm_quant_fusion_pass) failed while rewriting a "
        f"graph (RuntimeError: {FAULT}); that graph is left unfused"
    ]


def test_fault_in_match_check_leaves_the_graph_unfused(monkeypatch, warnings_logged):
    from vllm_fusion.passes.act_quant_fusion import SiluMulQuantPattern

    wrap, _ = fail_from_call(1)
    monkeypatch.setattr(SiluMulQuantPattern, "extra_check",
                        wrap(SiluMulQuantPattern.extra_check))

    result = compile_stack()

    assert result.matches[NORM_PASS] == 4
    assert result.matches[ACT_PASS] == 0
    assert result.count("_C.silu_and_mul.default") == 2  # both sites as vLLM left them
    failures = rewrite_failures(warnings_logged())
    assert len(failures) == 1
    assert "fuse_act_quant (activation_quant_fusion_pass)" in failures[0]
    assert f"RuntimeError: {FAULT}" in failures[0]


def test_a_fault_on_every_graph_warns_once_per_error(monkeypatch, warnings_logged):
    result = compile_stack()
    norm_pass = next(p for p in result.manager.passes if type(p).__name__ == "RMSNormQuantFusionPass")

    def broken_apply(graph):
        # Half a rewrite, then the fault: the graph must come back whole.
        relu = next(n for n in graph.nodes if n.target is torch.relu)
        with graph.inserting_after(relu):
            extra = graph.call_function(torch.sigmoid, (relu,))
        relu.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
        raise ValueError("bad match")

    monkeypatch.setattr(norm_pass.pm_pass, "apply", broken_apply)
    modules = [torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2) for _ in range(3)]
    before = [str(gm.graph) for gm in modules]
    for gm in modules:
        norm_pass(gm.graph)
        gm.graph.lint()
    assert [str(gm.graph) for gm in modules] == before
    assert norm_pass.matched_count == 0
    assert len(rewrite_failures(warnings_logged())) == 1
    assert modules[0](torch.ones(2)).tolist() == [2.0, 2.0]


def test_a_bug_in_resolving_the_settings_keeps_vllms_passes(monkeypatch, warnings_logged):
    import vllm.envs as envs
    from vllm.config import set_current_vllm_config

    from tests.cpu.compile_harness import configured_pass_manager, pass_key
    from vllm_fusion.passes import pass_manager_hook

    def broken(config):
        raise KeyError("injected resolver fault")

    monkeypatch.setattr(pass_manager_hook, "resolve", broken)
    pass_manager_hook.install_compile_factors_hook()
    config = make_vllm_config(custom_ops=["+quant_fp8"],
                              pass_config={"fuse_norm_quant": True, "fuse_act_quant": True})
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
        factors = envs.compile_factors()
    assert [pass_key(p) for p in manager.passes] == [
        "vllm:NoOpEliminationPass", "vllm:RMSNormQuantFusionPass",
        "vllm:ActivationQuantFusionPass"]
    assert factors["VLLM_FUSION_SETTINGS"].startswith("unresolved: KeyError")
    assert any("could not resolve its settings (KeyError: 'injected resolver fault')" in m
               for m in warnings_logged())
