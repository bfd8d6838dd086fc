"""(QK-norm +) RoPE + KV-cache write -> one kernel (``fuse_rope_kvcache``).

Each attention layer of a Llama-like model computes, in the post-grad graph (after vLLM's
``SplitCoalescingPass`` and ``ScatterSplitReplacementPass``, which this pass runs first)::

    q, k, v = split(qkv, [q_size, k_size, v_size], -1)
    q, k    = _C.rotary_embedding(positions, q, k, head_size, cos_sin_cache, is_neox)
    dummy   = vllm.unified_kv_cache_update(k.view(-1, Hkv, D), v.view(-1, Hkv, Dv), layer_name)
    ...       vllm.unified_attention_with_output(q.view(-1, H, D), k_view, v_view, ...,
                                                 kv_cache_dummy_dep=dummy)

and a Qwen3-like one applies a per-head ``vllm_ir.rms_norm`` to q and k before the rotary.
Both become ``vllm_fusion.rope_kv_cache_update`` (vllm_fusion/ops/rope_cache_update.py),
whose ``dummy`` feeds attention's ``kv_cache_dummy_dep`` and whose q_out / k_out feed
attention: the rotated q and k are written once, straight from the kernel, and the KV cache
in the same launch.

The cache update is only in the compiled graph when ``vllm::unified_kv_cache_update`` is not a
splitting op: the package keeps it out of vLLM's default splitting ops when this fusion is on
(pass_manager_hook.install_splitting_ops_hook). Layers the kernel cannot serve (backend,
cache dtype, KV sharing, ...) are left unfused, with a debug log naming the layer and why.

vLLM's own pass (ROCm/AITER only in vLLM 0.26) is replaced; on ROCm with AITER the resolver
delegates the fusion back to it, as the matrix says.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import NamedTuple

import torch
import torch._inductor.pattern_matcher as pm
import vllm.ir.ops
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from vllm.compilation.passes.fusion.matcher_utils import MatcherRotaryEmbedding
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.utils.torch_utils import _USE_LAYERNAME, LayerName, _encode_layer_name

from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.ops import rope_cache_update
from vllm_fusion.ops.rope_cache_update import MAX_HEAD_SIZE, rope_kvcache_supported
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import EPSILONS, fake_value, last_dim_contiguous

logger = init_logger(__name__)

SPLIT_OP = torch.ops.aten.split_with_sizes.default
# Pattern example sizes (any token count matches).
_TOKENS, _MAX_POSITIONS = 5, 4096
_EXAMPLE_LAYER = "model.layers.0.self_attn.attn"
_COS_SIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Geometry(NamedTuple):
    """What an attention layer's q/k/v split and views depend on."""

    head_size: int
    head_size_v: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def of(cls, layer) -> Geometry:
        return cls(layer.head_size, layer.head_size_v, layer.num_heads, layer.num_kv_heads)

    @property
    def sizes(self) -> list[int]:
        return [self.num_heads * self.head_size, self.num_kv_heads * self.head_size,
                self.num_kv_heads * self.head_size_v]

    def describe(self) -> str:
        return f"D={self.head_size},Dv={self.head_size_v},H={self.num_heads},Hkv={self.num_kv_heads}"


def attention_layers(config: VllmConfig) -> dict:
    from vllm.model_executor.layers.attention import Attention

    try:
        return get_layers_from_vllm_config(config, Attention)
    except Exception:  # no model built in this config (unit tests of the pass alone)
        return {}


def geometries(layers) -> list[Geometry]:
    return sorted({Geometry.of(layer) for layer in layers})


def matched_nodes(match: pm.Match, target) -> list[torch.fx.Node]:
    return [n for n in match.nodes if n.op == "call_function" and n.target == target]


def rotary_nodes(match: pm.Match) -> list[torch.fx.Node]:
    return [n for n in matched_nodes(match, auto_functionalized)
            if "head_size" in n.kwargs and "cos_sin_cache" in n.kwargs]


def norm_nodes(match: pm.Match) -> list[torch.fx.Node]:
    return matched_nodes(match, torch.ops.vllm_ir.rms_norm.default)


def layer_name_of(match: pm.Match) -> str | None:
    """The attention layer's name: the opaque LayerName graph input's value."""
    node = match.kwargs.get("layer_name")
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
    # Under fake mode the graph holds a FakeScriptObject around the real LayerName.
    value = getattr(value, "real_obj", value)
    if isinstance(value, LayerName):
        return value.value
    return value if isinstance(value, str) else None


class RopePattern(FusionPattern):
    """What both RoPE fusions share: the geometry, the rotary matcher, the checks."""

    def __init__(self, geometry: Geometry, is_neox: bool, epsilon: float | None,
                 dtype: torch.dtype, use_flashinfer: bool = False):
        self.geometry = geometry
        self.is_neox = is_neox
        self.epsilon = epsilon  # None: no QK-norm
        self.dtype = dtype
        self.use_flashinfer = use_flashinfer
        self.q_size, self.k_size, self.v_size = geometry.sizes
        self.rope = MatcherRotaryEmbedding(
            is_neox=is_neox, head_size=geometry.head_size, num_heads=geometry.num_heads,
            num_kv_heads=geometry.num_kv_heads, use_flashinfer=use_flashinfer)

    def describe(self) -> str:
        norm = f"qk_norm@eps={self.epsilon}+" if self.epsilon is not None else ""
        style = "neox" if self.is_neox else "gptj"
        fi = "/flashinfer" if self.use_flashinfer else ""
        return f"{type(self).__name__}:{norm}rope[{style}{fi}]@{self.geometry.describe()}"

    def _empty(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype or self.dtype, device="cuda")

    def tensor_inputs(self) -> list[torch.Tensor]:
        cos_sin_dtype = torch.float32 if self.use_flashinfer else self.dtype
        inputs = [self._empty(_TOKENS, sum(self.geometry.sizes)),
                  self._empty(_TOKENS, dtype=torch.int64),
                  self._empty(_MAX_POSITIONS, self.geometry.head_size, dtype=cos_sin_dtype)]
        if self.epsilon is not None:
            inputs += [self._empty(self.geometry.head_size), self._empty(self.geometry.head_size)]
        return inputs

    def split(self, qkv: torch.Tensor):
        try:
            return qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)
        except ValueError as e:
            # Another geometry's site: the matcher takes a RuntimeError as "no match".
            raise RuntimeError(str(e)) from e

    def norm_and_rope(self, q, k, positions, cos_sin_cache, q_weight=None, k_weight=None):
        """vLLM's graph: (Qwen3Attention's per-head RMSNorm of q and k, then) the rotary."""
        if self.epsilon is not None:
            d = self.geometry.head_size
            q_by_head = q.view(*q.shape[:-1], q.shape[-1] // d, d)
            q = vllm.ir.ops.rms_norm(q_by_head, q_weight, self.epsilon).view(q.shape)
            k_by_head = k.view(*k.shape[:-1], k.shape[-1] // d, d)
            k = vllm.ir.ops.rms_norm(k_by_head, k_weight, self.epsilon).view(k.shape)
        return self.rope(positions, q, k, cos_sin_cache)

    def heads(self, q, k, v):
        g = self.geometry
        return (q.view(-1, g.num_heads, g.head_size), k.view(-1, g.num_kv_heads, g.head_size),
                v.view(-1, g.num_kv_heads, g.head_size_v))

    def extra_check(self, match: pm.Match) -> bool:
        return self.why_not(match) is None

    def why_not(self, match: pm.Match) -> str | None:
        """Why the kernel cannot take this match; None when it can."""
        g = self.geometry
        splits = matched_nodes(match, SPLIT_OP)
        if len(splits) != 1 or list(splits[0].args[1]) != g.sizes:
            return "q/k/v split sizes of another geometry"
        rotary = rotary_nodes(match)
        if len(rotary) != 1 or rotary[0].kwargs["head_size"] != g.head_size:
            return "rotary head size of another geometry"
        norms = norm_nodes(match)
        if any(n.args[2] != self.epsilon for n in norms):
            return "RMSNorm epsilon of another pattern"
        qkv, positions = fake_value(match, "qkv"), fake_value(match, "positions")
        cos_sin = fake_value(match, "cos_sin_cache")
        if qkv is None or positions is None or cos_sin is None:
            return "no fake values"
        if qkv.dtype not in (torch.bfloat16, torch.float16) or not last_dim_contiguous(qkv):
            return f"qkv dtype {qkv.dtype} / strides {qkv.stride()}"
        if positions.dtype not in (torch.int64, torch.int32):
            return f"positions dtype {positions.dtype}"
        rot = cos_sin.shape[-1] if cos_sin.dim() == 2 else -1
        if (cos_sin.dtype not in _COS_SIN_DTYPES or rot % 2 or rot > g.head_size
                or not cos_sin.is_contiguous()):
            return f"cos_sin_cache {cos_sin.dtype} {tuple(cos_sin.shape)}"
        if g.head_size % 2 or g.head_size > MAX_HEAD_SIZE:
            return f"head size {g.head_size}"
        if self.epsilon is not None:
            for name in ("q_weight", "k_weight"):
                w = fake_value(match, name)
                if w is None or w.dtype != qkv.dtype or w.numel() != g.head_size:
                    return f"{name} {None if w is None else (w.dtype, tuple(w.shape))}"
        return None


class RopeKVCachePattern(RopePattern):
    """split -> (per-head RMSNorm of q and k ->) rotary -> views -> unified_kv_cache_update."""

    def __init__(self, geometry: Geometry, is_neox: bool, epsilon: float | None,
                 dtype: torch.dtype, config: VllmConfig):
        super().__init__(geometry, is_neox, epsilon, dtype)
        self.forward_context = config.compilation_config.static_forward_context

    def get_inputs(self) -> list:
        return [*self.tensor_inputs(), _encode_layer_name(_EXAMPLE_LAYER)]

    @property
    def pattern(self):
        if self.epsilon is None:
            def pattern(qkv, positions, cos_sin_cache, layer_name):
                return self._pattern(qkv, positions, cos_sin_cache, None, None, layer_name)
        else:
            def pattern(qkv, positions, cos_sin_cache, q_weight, k_weight, layer_name):
                return self._pattern(qkv, positions, cos_sin_cache, q_weight, k_weight,
                                     layer_name)
        return pattern

    def _pattern(self, qkv, positions, cos_sin_cache, q_weight, k_weight, layer_name):
        q, k, v = self.split(qkv)
        q, k = self.norm_and_rope(q, k, positions, cos_sin_cache, q_weight, k_weight)
        _, k_view, v_view = self.heads(q, k, v)
        dummy = torch.ops.vllm.unified_kv_cache_update(k_view, v_view, layer_name)
        # q stays flat: attention views it, or quantizes it first (fp8 query).
        return dummy, q, k_view, v_view

    @property
    def replacement(self):
        if self.epsilon is None:
            def replacement(qkv, positions, cos_sin_cache, layer_name):
                return self._replacement(qkv, positions, cos_sin_cache, None, None, layer_name)
        else:
            def replacement(qkv, positions, cos_sin_cache, q_weight, k_weight, layer_name):
                return self._replacement(qkv, positions, cos_sin_cache, q_weight, k_weight,
                                         layer_name)
        return replacement

    def _replacement(self, qkv, positions, cos_sin_cache, q_weight, k_weight, layer_name):
        q, k, v = self.heads(*self.split(qkv))
        q_out, k_out, dummy = torch.ops.vllm_fusion.rope_kv_cache_update.default(
            q, k, v, positions, cos_sin_cache, self.is_neox, q_weight, k_weight,
            self.epsilon or 0.0, layer_name)
        return dummy, q_out.view(-1, self.q_size), k_out, v

    def why_not(self, match: pm.Match) -> str | None:
        reason = super().why_not(match)
        if reason is not None:
            return reason
        name = layer_name_of(match)
        layer = self.forward_context.get(name) if name is not None else None
        if layer is None:
            return f"attention layer {name!r} not found"
        if Geometry.of(layer) != self.geometry:
            return "layer of another geometry"
        reason = rope_kvcache_supported(layer, fake_value(match, "qkv").dtype)
        if reason is not None:
            logger.debug("vllm_fusion: fuse_rope_kvcache skips %s: %s", name, reason)
        return reason


class RopeFusionPass(FusionPass):
    """What both RoPE passes share: vLLM's split clean-ups run first, and the uuid covers
    the shared pattern code."""

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        self.split_coalescing, self.scatter_split = utility_passes(config)

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self._pattern_replacements:
            run_utility_passes(self, graph)
        super().__call__(graph)

    def _pattern_types(self) -> list:
        # For the uuid: the shared pattern code and the op, beyond the concrete classes.
        return [*super()._pattern_types(), rope_sources()]


class RopeKVCacheFusionPass(RopeFusionPass):
    """``fuse_rope_kvcache``: (QK-norm +) RoPE + KV-cache write -> one kernel per layer."""

    flag = "fuse_rope_kvcache"
    name = "rope_kv_cache_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        assert rope_cache_update.OP_NAME  # the op is registered by importing the module
        if not _USE_LAYERNAME:
            # The layer name is then a string constant per layer; vLLM 0.26 on torch 2.11
            # passes it as an opaque graph input unless VLLM_USE_LAYERNAME=0.
            logger.warning_once("vllm_fusion: %s needs VLLM_USE_LAYERNAME=1 (vLLM's default on "
                                "torch 2.11); no layer is fused", self.flag)
            return
        layers = attention_layers(config)
        supported = []
        for name, layer in layers.items():
            reason = rope_kvcache_supported(layer, self.pattern_dtype())
            if reason is None:
                supported.append(layer)
            else:
                logger.debug("vllm_fusion: %s skips %s: %s", self.flag, name, reason)
        dtype = self.pattern_dtype()
        for geometry in geometries(supported):
            # The QK-norm forms first: they are the larger patterns.
            for epsilon in (*EPSILONS, None):
                for is_neox in (True, False):
                    self.register(RopeKVCachePattern(geometry, is_neox, epsilon, dtype, config))
        self.dump_patterns(config, self.pm_pass)


@functools.cache
def rope_sources() -> str:
    """This module and the op the replacements call: the pattern classes' shared code."""
    return inspect.getsource(sys.modules[__name__]) + inspect.getsource(rope_cache_update)


def utility_passes(config: VllmConfig):
    """vLLM's clean-ups that make the split -> rotary -> views chain matchable."""
    from vllm.compilation.passes.utility.scatter_split_replace import ScatterSplitReplacementPass
    from vllm.compilation.passes.utility.split_coalescing import SplitCoalescingPass

    return SplitCoalescingPass(config), ScatterSplitReplacementPass(config)


def run_utility_passes(fusion_pass, graph: torch.fx.Graph) -> None:
    try:
        fusion_pass.split_coalescing(graph)
        fusion_pass.scatter_split(graph)
    except Exception as e:  # leave the graph to the pattern matcher as it is
        logger.warning_once("vllm_fusion: %s: vLLM's split clean-up passes failed (%s: %s)",
                            fusion_pass.flag, type(e).__name__, e)
