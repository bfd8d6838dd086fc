"""Trace a small model built from vLLM's layers and run the post-grad pass
manager exactly as vLLM configures it, on fake CUDA tensors (no GPU needed).

    config = make_vllm_config(dtype=torch.bfloat16, custom_ops=["+quant_fp8"],
                              pass_config={"fuse_norm_quant": True})
    result = run_post_grad_passes(lambda: MyModel(...), lambda: [x], config)
    result.matches["vllm_fusion:RMSNormQuantFusionPass"]  # per-pass match counts
    result.ops_before["_C.static_scaled_fp8_quant.default"]

What vLLM does in ``VllmBackend`` and is reproduced here: the pre-grad vLLM-IR
in-place functionalization, AOTAutograd with vLLM's decompositions and
auto-functionalization V1, and ``PostGradPassManager.configure(config)`` (with
the plugin's hook when it is installed) followed by ``manager(graph)`` inside a
pass context for the compile range.
"""

from __future__ import annotations

import collections
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape
from torch._subclasses.fake_tensor import FakeTensorMode

TINY_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "head_dim": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "vocab_size": 1024,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def local_model_dir(**overrides: Any) -> str:
    """A model directory holding only config.json (no weights, no download)."""
    path = Path(tempfile.mkdtemp(prefix="vllm_fusion_model_"))
    (path / "config.json").write_text(json.dumps({**TINY_MODEL, **overrides}))
    return str(path)


def make_vllm_config(
    *,
    dtype: torch.dtype = torch.bfloat16,
    custom_ops: Iterable[str] = (),
    pass_config: dict[str, Any] | None = None,
    optimization_level: int | None = None,
    additional_config: dict[str, Any] | None = None,
    compilation: dict[str, Any] | None = None,
    **model_overrides: Any,
):
    """A VllmConfig for ``-O<level>`` compilation of a tiny local model; ``compilation``:
    more CompilationConfig fields (splitting_ops, use_inductor_graph_partition, ...)."""
    from vllm.config import CompilationConfig, CompilationMode, ModelConfig, PassConfig, VllmConfig

    model = local_model_dir(**model_overrides)
    model_config = ModelConfig(model=model, tokenizer=model, dtype=dtype, skip_tokenizer_init=True)
    compilation_config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE,
        custom_ops=list(custom_ops),
        pass_config=PassConfig(**(pass_config or {})),
        **(compilation or {}),
    )
    kwargs: dict[str, Any] = {}
    if optimization_level is not None:
        kwargs["optimization_level"] = optimization_level
    return VllmConfig(
        model_config=model_config,
        compilation_config=compilation_config,
        additional_config=additional_config or {},
        **kwargs,
    )


def op_name(node: torch.fx.Node) -> str | None:
    """'aten.add.Tensor', '_C.rms_norm.default', ...; auto_functionalized is unwrapped."""
    if node.op != "call_function":
        return None
    target = node.target
    if target is auto_functionalized:
        target = node.args[0]
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def count_ops(graph: torch.fx.Graph) -> collections.Counter:
    return collections.Counter(name for n in graph.nodes if (name := op_name(n)))


def pass_key(p: Any) -> str:
    """'vllm:RMSNormQuantFusionPass' or 'vllm_fusion:RMSNormQuantFusionPass'."""
    return f"{type(p).__module__.split('.')[0]}:{type(p).__name__}"


@dataclass
class PassRun:
    passes: list[str]
    matches: dict[str, int]
    ops_before: collections.Counter
    ops_after: collections.Counter
    uuid: str
    manager: Any = field(repr=False)
    # The post-grad graph as text (node names included), for exact comparisons.
    graph_after: str = field(default="", repr=False)
    # fake=False: what the post-grad graph returned, and the real model and inputs.
    output: Any = field(default=None, repr=False)
    model: Any = field(default=None, repr=False)
    inputs: Any = field(default=None, repr=False)

    def count(self, op: str, *, after: bool = True) -> int:
        return (self.ops_after if after else self.ops_before)[op]


def configured_pass_manager(config):
    """A PostGradPassManager configured for ``config``, as VllmBackend makes it."""
    from vllm.compilation.passes.pass_manager import PostGradPassManager

    manager = PostGradPassManager()
    manager.configure(config)
    return manager


def run_post_grad_passes(
    make_model: Callable[[], torch.nn.Module],
    make_inputs: Callable[[], list[torch.Tensor]],
    config,
    *,
    compile_range: tuple[int, int] = (1, 8192),
    dynamic_dims: dict[int, int] | None = None,
    fake: bool = True,
) -> PassRun:
    """Compile ``make_model()(*make_inputs())`` and run vLLM's post-grad passes on it.

    ``dynamic_dims`` maps input index -> dimension to mark dynamic (default: dim 0
    of input 0, the token dimension, as vLLM compiles). ``fake=False`` (GPU tests): a real
    model and real inputs; ``PassRun.output`` is what the graph after the passes returns, and
    ``PassRun.model``/``inputs`` are there to compute the eager reference from.
    """
    from vllm.compilation.passes.inductor_pass import get_pass_context, pass_context
    from vllm.compilation.passes.ir.inplace_functionalization import (
        VllmIRInplaceFunctionalizationPass,
    )
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import Range

    captured: dict[str, Any] = {}
    with (
        set_current_vllm_config(config),
        config.kernel_config.ir_op_priority.set_priority(),
        torch._inductor.config.patch(enable_auto_functionalized_v2=False),
        pass_context(Range(start=compile_range[0], end=compile_range[1])),
    ):
        pre_grad = VllmIRInplaceFunctionalizationPass(config)
        manager = None

        def forward_compiler(gm: torch.fx.GraphModule, _example_inputs):
            # What Inductor's compile_fx does before its post-grad custom pass.
            view_to_reshape(gm)
            remove_noop_ops(gm.graph)
            captured["before"] = count_ops(gm.graph)
            manager(gm.graph)
            gm.recompile()
            captured["after"] = count_ops(gm.graph)
            captured["graph_after"] = str(gm.graph)
            captured["uuid"] = manager.uuid()
            return gm.forward

        post_grad = aot_autograd(fw_compiler=forward_compiler, decompositions=select_decomp_table())

        def backend(gm: torch.fx.GraphModule, example_inputs):
            pre_grad(gm.graph)  # vLLM installs it as Inductor's pre_grad_custom_pass
            gm.recompile()
            return post_grad(gm, example_inputs)

        torch._dynamo.reset()
        fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
        with fake_mode, torch.device("cuda"):
            model = make_model()
            inputs = make_inputs()
        # As in vLLM, the passes are configured once the model (its attention layers) exists.
        manager = configured_pass_manager(config)
        for index, dim in (dynamic_dims or {0: 0}).items():
            torch._dynamo.mark_dynamic(inputs[index], dim)
        # Stay in fake mode: factory ops inside the graph must not touch a device.
        with fake_mode:
            output = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
        assert get_pass_context() is not None

    return PassRun(
        passes=[pass_key(p) for p in manager.passes],
        matches={
            pass_key(p): p.matched_count for p in manager.passes if hasattr(p, "matched_count")
        },
        ops_before=captured["before"],
        ops_after=captured["after"],
        uuid=captured["uuid"],
        manager=manager,
        graph_after=captured["graph_after"],
        output=None if fake else output,
        model=None if fake else model,
        inputs=None if fake else inputs,
    )
