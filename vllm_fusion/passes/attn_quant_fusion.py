"""Attention -> static FP8 quant of its output -> attention writing FP8 (``fuse_attn_quant``).

In a Llama-like FP8 model the attention output feeds ``o_proj``, whose input is quantized with
a static per-tensor scale. The post-grad graph holds::

    at  = auto_functionalized(vllm.unified_attention_with_output, query=q, key=k, value=v,
                              output=out, layer_name=layer, output_scale=None, ...)
    y   = reshape(at[1], [T, H * Dv])
    yq  = static FP8 quant(y, scale)          # _C.static_scaled_fp8_quant or native

which becomes the same attention call writing an FP8 ``[T, H, Dv]`` output with
``output_scale=scale``: the backend's kernel quantizes while it stores, and the bf16/fp16
attention output is never written nor read back.

Only layers whose backend says it can write that output (``impl.fused_output_quant_supported``)
are fused: in vLLM 0.26, TRITON_ATTN (and on ROCm ROCM_ATTN, ROCM_AITER_UNIFIED_ATTN), and
FLASHINFER's trtllm-gen path on SM100 with an FP8 KV cache. FLASH_ATTN cannot: its
``fused_output_quant_supported`` is the base class's False and its ``forward`` raises on an
``output_scale`` (the FlashAttention kernels store in the query dtype). Other layers are left as
they are, with a debug log naming the layer and why.

Attention is only in the compiled graph when it is not a splitting op: vLLM 0.26 itself sets
``splitting_ops = []`` (and FULL CUDA graphs) when ``fuse_attn_quant`` is on, unless
``use_inductor_graph_partition`` keeps it in the graph. NVFP4 output (FlashInfer trtllm-gen on
SM100) is left to vLLM's own pass: the matrix delegates NVFP4 models to it.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
import torch._inductor.pattern_matcher as pm
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from vllm.config import VllmConfig
from vllm.platforms import current_platform
from vllm.utils.torch_utils import _USE_LAYERNAME, _encode_layer_name

from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import load_matrix
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import FP8_STATIC, fake_value
from vllm_fusion.passes.rope_kvcache_fusion import attention_layers, layer_name_of

logger = init_logger(__name__)

ATTN_OP = torch.ops.vllm.unified_attention_with_output.default
RESHAPE_OP = torch.ops.aten.reshape.default
FP8_DTYPE = current_platform.fp8_dtype()
# Pattern example sizes (any token count and layer name match).
_TOKENS = 5
_EXAMPLE_LAYER = "model.layers.0.self_attn.attn"


class OutputGeometry(NamedTuple):
    """The attention output's ``[T, num_heads, head_size_v]`` shape, per token."""

    num_heads: int
    head_size_v: int

    @classmethod
    def of(cls, layer) -> OutputGeometry:
        return cls(layer.num_heads, layer.head_size_v)

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_size_v

    def describe(self) -> str:
        return f"H={self.num_heads},Dv={self.head_size_v}"


def backend_name(layer) -> str:
    backend = getattr(layer, "attn_backend", None)
    try:
        return backend.get_name()
    except Exception:  # a backend class without a name: say what the impl is
        return type(getattr(layer, "impl", None)).__name__


def output_quant_unsupported(layer, scheme=FP8_STATIC) -> str | None:
    """Why ``layer``'s backend cannot write ``scheme``-quantized output; None when it can."""
    impl = getattr(layer, "impl", None)
    if impl is None:
        return "the layer has no attention implementation"
    try:
        supported = impl.fused_output_quant_supported(scheme.key)
    except Exception as e:  # a backend that cannot even answer is not fused
        return f"{type(impl).__name__}.fused_output_quant_supported raised {type(e).__name__}: {e}"
    if not supported:
        return (f"attention backend {backend_name(layer)} ({type(impl).__name__}) cannot write "
                f"{scheme} output (fused_output_quant_supported is False)")
    return None


class AttnFp8StaticQuantPattern(FusionPattern):
    """Attention -> reshape to ``[T, H * Dv]`` -> static FP8 quant, for one output geometry.

    ``cache_dep``: the attention call waits on a KV-cache update (``kv_cache_dummy_dep``);
    layers sharing another layer's cache have none."""

    def __init__(self, geometry: OutputGeometry, dtype: torch.dtype, cache_dep: bool,
                 symbolic_tokens: bool, fusion_pass: AttnQuantFusionPass):
        self.geometry = geometry
        self.dtype = dtype
        self.cache_dep = cache_dep
        # The flattening reshape's token dim: -1 (Attention.forward's ``view(-1, hidden)``)
        # or the token count (``view(num_tokens, hidden)``, the form vLLM's pattern has).
        self.symbolic_tokens = symbolic_tokens
        self.fusion_pass = fusion_pass
        self.quant = FP8_STATIC.matcher()

    def describe(self) -> str:
        dep = "+cache_dep" if self.cache_dep else ""
        quant = "custom" if self.quant.enabled else "native"
        tokens = "T" if self.symbolic_tokens else "-1"
        return (f"{type(self).__name__}:{FP8_STATIC}[{quant}]{dep}@{self.geometry.describe()},"
                f"reshape[{tokens}]")

    def _empty(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype or self.dtype, device="cuda")

    def get_inputs(self) -> list:
        g = self.geometry
        # q, k, v only pass through: their head counts and sizes do not matter.
        qkv = [self._empty(_TOKENS, g.num_heads, g.head_size_v) for _ in range(3)]
        inputs = [*qkv, self._empty(_TOKENS, g.num_heads, g.head_size_v),
                  self._empty(1, 1, dtype=torch.float32)]
        if self.cache_dep:
            inputs.append(self._empty(0))
        return [*inputs, _encode_layer_name(_EXAMPLE_LAYER)]

    def _attention(self, q, k, v, output, layer_name, cache_dep, output_scale=None):
        return auto_functionalized(
            ATTN_OP, query=q, key=k, value=v, output=output, layer_name=layer_name,
            output_scale=output_scale, output_block_scale=None, kv_cache_dummy_dep=cache_dep)

    def _pattern(self, q, k, v, output, scale, cache_dep, layer_name):
        at = self._attention(q, k, v, output, layer_name, cache_dep)
        # Attention.forward's ``output.view(-1, hidden)``, as view_to_reshape leaves it.
        tokens = q.shape[0] if self.symbolic_tokens else -1
        y = RESHAPE_OP(at[1], [tokens, self.geometry.hidden])
        return self.quant(y, scale)[0]

    def _replacement(self, q, k, v, output, scale, cache_dep, layer_name):
        g = self.geometry
        fp8_output = torch.empty([q.shape[0], g.num_heads, g.head_size_v], dtype=FP8_DTYPE,
                                 device=q.device)
        at = self._attention(q, k, v, fp8_output, layer_name, cache_dep, output_scale=scale)
        return RESHAPE_OP(at[1], [-1, g.hidden])

    @property
    def pattern(self):
        if self.cache_dep:
            def pattern(q, k, v, output, scale, cache_dep, layer_name):
                return self._pattern(q, k, v, output, scale, cache_dep, layer_name)
        else:
            def pattern(q, k, v, output, scale, layer_name):
                return self._pattern(q, k, v, output, scale, None, layer_name)
        return pattern

    @property
    def replacement(self):
        if self.cache_dep:
            def replacement(q, k, v, output, scale, cache_dep, layer_name):
                return self._replacement(q, k, v, output, scale, cache_dep, layer_name)
        else:
            def replacement(q, k, v, output, scale, layer_name):
                return self._replacement(q, k, v, output, scale, None, layer_name)
        return replacement

    def extra_check(self, match: pm.Match) -> bool:
        name = layer_name_of(match)
        reason = self.why_not(match, name)
        if reason is not None:
            logger.debug("vllm_fusion: fuse_attn_quant leaves %s unfused: %s", name, reason)
            return False
        self.fusion_pass.layer_matches[name] += 1
        return True

    def why_not(self, match: pm.Match, name: str | None) -> str | None:
        """Why this match cannot take the fused output; None when it can."""
        layer = self.fusion_pass.all_layers.get(name) if name is not None else None
        if layer is None:
            return f"attention layer {name!r} not found"
        if OutputGeometry.of(layer) != self.geometry:
            return "layer of another output geometry"
        reason = output_quant_unsupported(layer)
        if reason is not None:
            return reason
        output, scale = fake_value(match, "output"), fake_value(match, "scale")
        if output is None or scale is None:
            return "no fake values"
        if output.dtype not in (torch.bfloat16, torch.float16):
            return f"attention output dtype {output.dtype}"
        if scale.dtype != torch.float32 or scale.numel() != 1:
            return f"quant scale {scale.dtype} {tuple(scale.shape)} is not one float32 value"
        return None


class AttnQuantFusionPass(FusionPass):
    """``fuse_attn_quant``: attention + static FP8 quant of its output -> attention writing
    FP8, for every layer whose backend can."""

    flag = "fuse_attn_quant"
    name = "attn_quant_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        # Matches of the last graph, by layer name.
        self.layer_matches: collections.Counter = collections.Counter()
        # Every attention layer (the matches name them), and those whose backend can fuse.
        self.all_layers = attention_layers(config)
        self.layers = self.supported_layers(self.all_layers)
        if not _USE_LAYERNAME:
            # The layer name is then a string constant per layer; vLLM 0.26 on torch 2.11
            # passes it as an opaque graph input unless VLLM_USE_LAYERNAME=0.
            logger.warning_once("vllm_fusion: %s needs VLLM_USE_LAYERNAME=1 (vLLM's default on "
                                "torch 2.11); no layer is fused", self.flag)
            return
        if FP8_STATIC not in self.schemes():
            logger.debug("vllm_fusion: %s: the matrix fuses no static FP8 here", self.flag)
            return
        dtype = self.pattern_dtype()
        for geometry in sorted({OutputGeometry.of(layer) for layer in self.layers.values()}):
            for cache_dep in (True, False):
                for symbolic_tokens in (False, True):
                    self.register(AttnFp8StaticQuantPattern(geometry, dtype, cache_dep,
                                                            symbolic_tokens, self))
        for backend in sorted({backend_name(layer) for layer in self.layers.values()}):
            self.warn_if_measured_slower(backend)
        self.dump_patterns(config, self.pm_pass)

    def supported_layers(self, layers: dict) -> dict:
        """The layers whose backend writes static FP8 output; the others logged at debug."""
        if not layers:
            logger.debug("vllm_fusion: %s: no attention layers in the model's forward "
                         "context: nothing to fuse", self.flag)
        supported = {}
        for name, layer in layers.items():
            reason = output_quant_unsupported(layer)
            if reason is None:
                supported[name] = layer
            else:
                logger.debug("vllm_fusion: %s skips %s: %s", self.flag, name, reason)
        return supported

    def warn_if_measured_slower(self, backend: str) -> None:
        """The user asked for the fusion; say so once where the matrix measured it slower."""
        row = load_matrix()[self.flag].backends.get(backend)
        loss = row.measured_loss(self.settings.platform) if row is not None else None
        if loss is not None:
            logger.warning_once(
                "vllm_fusion: %s fuses %s layers as pass_config asks, but on %s it was measured "
                "slower than unfused: %s", self.flag, backend, self.settings.platform, loss)

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.layer_matches = collections.Counter()
        super().__call__(graph)
        if self.matched_count == 0:
            self.layer_matches = collections.Counter()  # the graph was put back
        elif self.layer_matches:
            logger.debug("vllm_fusion: %s fused %s", self.flag, dict(self.layer_matches))


def vllm_mla_passes(config: VllmConfig) -> list:
    """vLLM's ``MLAAttnQuantFusionPass``, which shares the flag: for models with MLA layers."""
    from vllm.compilation.passes.fusion.mla_attn_quant_fusion import MLAAttnQuantFusionPass
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    try:
        has_mla = bool(get_layers_from_vllm_config(config, MLAAttention))
    except Exception:  # no model built in this config (unit tests of the pass alone)
        has_mla = False
    return [MLAAttnQuantFusionPass(config)] if has_mla else []
