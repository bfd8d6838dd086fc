"""The quantization schemes the fused kernels produce, as vLLM 0.26 emits them: FP8
(``QuantFP8``, custom op or native) and NVFP4 (``scaled_fp4_quant``, SM100+)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._inductor.pattern_matcher as pm
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from vllm.platforms import current_platform
from vllm.compilation.passes.fusion.matcher_utils import QUANT_OPS, MatcherQuantFP8
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    QuantKey,
    get_fp8_min_max,
    kFp8Dynamic64Sym,
    kFp8Dynamic128Sym,
    kFp8DynamicTokenSym,
    kFp8StaticTensorSym,
    kNvfp4Dynamic,
)


@dataclass(frozen=True)
class FP8Scheme:
    name: str
    key: QuantKey
    # Per-group only: scales stored column-major / rounded up to powers of two.
    col_major: bool = False
    e8m0: bool = False

    @property
    def static(self) -> bool:
        return self.key.scale.static

    @property
    def family(self) -> str:
        """The matrix's name for the scheme: fp8-static, fp8-per-token or fp8-group."""
        if self.static:
            return "fp8-static"
        return "fp8-group" if self.group_size else "fp8-per-token"

    @property
    def group_size(self) -> int:
        """0 for per-token scales, else the group width along the hidden dim."""
        shape = self.key.scale.group_shape
        return shape.col if shape.is_per_group() else 0

    def matcher(self) -> MatcherQuantFP8:
        """vLLM's quant matcher: custom op or native, as the model emits it."""
        return MatcherQuantFP8(self.key, has_col_major_scales=self.col_major, is_e8m0=self.e8m0)

    def native_grouped(self, matcher: MatcherQuantFP8) -> bool:
        """Whether patterns match the native per-group quant in its grouped form."""
        return self.group_size > 0 and not matcher.enabled

    def quantize(self, matcher: MatcherQuantFP8, y: torch.Tensor, scale=None):
        """The quantization as a pattern sees it: ``(q, scale)``.

        Native per-group quant is matched up to its grouped ``[T, G, g]`` values
        and ``[T, G, 1]`` scales: the reshapes after it carry symbolic token
        counts that a pattern traced on example shapes cannot reproduce, so they
        stay in the graph and apply to the fused op's outputs instead.
        """
        if self.native_grouped(matcher):
            return native_group_quant(y, self.group_size, self.e8m0)
        return matcher(y, scale) if self.static else matcher(y)

    def fused_outputs(self, matcher: MatcherQuantFP8, q: torch.Tensor, scales: torch.Tensor):
        """The fused op's ``(q, scales)`` in the form ``quantize`` returns."""
        if self.native_grouped(matcher):
            groups = q.shape[-1] // self.group_size
            return q.reshape(-1, groups, self.group_size), scales.reshape(-1, groups, 1)
        return q, scales

    def op_args(self, matcher: MatcherQuantFP8) -> tuple[int, bool, bool]:
        """``(group_size, scale_transposed, scale_ue8m0)`` for the dynamic fused ops."""
        # The grouped native form ends before the scale transpose: the graph keeps it.
        transposed = self.col_major and not self.native_grouped(matcher)
        return self.group_size, transposed, self.e8m0

    def __str__(self) -> str:
        return self.name


def _group_schemes(key: QuantKey, size: int) -> list[FP8Scheme]:
    return [
        FP8Scheme(f"fp8-group{size}{'-colmajor' * col}{'-ue8m0' * e8m0}", key, col, e8m0)
        for col in (False, True)
        for e8m0 in (False, True)
    ]


FP8_STATIC = FP8Scheme("fp8-static", kFp8StaticTensorSym)
FP8_PER_TOKEN = FP8Scheme("fp8-per-token", kFp8DynamicTokenSym)
# TMA-aligned group scales are not produced: the caller preallocates their
# padded buffer, which a functional op cannot match.
FP8_SCHEMES: tuple[FP8Scheme, ...] = (
    FP8_STATIC,
    FP8_PER_TOKEN,
    *_group_schemes(kFp8Dynamic128Sym, 128),
    *_group_schemes(kFp8Dynamic64Sym, 64),
)

EPSILONS = (1e-5, 1e-6)

_FP8_MIN, _FP8_MAX = get_fp8_min_max()
_FP8_MIN_SCALING_FACTOR = 1.0 / (_FP8_MAX * 512.0)


def native_group_quant(y: torch.Tensor, group_size: int, e8m0: bool):
    """vLLM 0.26's ``QuantFP8._quantize_group_native`` up to its grouped outputs."""
    grouped = y.reshape(-1, y.shape[-1] // group_size, group_size)
    absmax = grouped.abs().max(dim=-1, keepdim=True)[0].float()
    scales = absmax / _FP8_MAX
    if e8m0:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    scales = scales.clamp(min=_FP8_MIN_SCALING_FACTOR)
    q = (grouped / scales).clamp(_FP8_MIN, _FP8_MAX).to(current_platform.fp8_dtype())
    return q, scales


def fake_value(match: pm.Match, name: str) -> torch.Tensor | None:
    node = match.kwargs.get(name)
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def last_dim_contiguous(t: torch.Tensor | None) -> bool:
    return t is not None and t.dim() >= 1 and t.stride(-1) == 1


# ----------------------------------------------------------------------------- NVFP4

NVFP4 = "nvfp4"  # the matrix's scheme family
NVFP4_BLOCK = 16


def nvfp4_quant_op():
    """vLLM's ``_C.scaled_fp4_quant.out``; None where vLLM has no NVFP4 quant (not CUDA)."""
    return QUANT_OPS.get(kNvfp4Dynamic)


def nvfp4_quantize(y, global_scale, output, output_scale):
    """What ``vllm._custom_ops.scaled_fp4_quant(y, global_scale)`` leaves in the graph: its
    out-variant, functionalized, writing the buffers it allocated (pattern inputs here, so
    any allocation matches). Returns ``(q, block_scales)``."""
    at = auto_functionalized(
        nvfp4_quant_op(),
        input=y,
        input_scale=global_scale,
        is_sf_swizzled_layout=True,
        output=output,
        output_scale=output_scale,
    )
    return at[1], at[2]


def nvfp4_example_buffers(tokens: int, hidden: int) -> list[torch.Tensor]:
    """Pattern example inputs: the output and swizzled scale buffers of ``[tokens, hidden]``."""
    rows = (tokens + 127) // 128 * 128
    k_tiles = (hidden // NVFP4_BLOCK + 3) // 4
    return [
        torch.empty(tokens, hidden // 2, dtype=torch.uint8, device="cuda"),
        torch.empty(rows, k_tiles, dtype=torch.int32, device="cuda"),
    ]


def nvfp4_buffers_ok(match: pm.Match, hidden: int) -> bool:
    """The matched quant writes exactly what the fused op returns: ``[m, hidden / 2]`` and the
    swizzled scales of ``hidden`` (not buffers padded to a larger K, ``padded_n``)."""
    out, scales = fake_value(match, "output"), fake_value(match, "output_scale")
    gs = fake_value(match, "global_scale")
    if out is None or scales is None or gs is None or hidden % NVFP4_BLOCK:
        return False
    k_tiles = (hidden // NVFP4_BLOCK + 3) // 4
    return (
        out.dtype == torch.uint8 and out.dim() == 2 and out.shape[-1] == hidden // 2
        and scales.dtype == torch.int32 and scales.dim() == 2 and scales.shape[-1] == k_tiles
        and gs.dtype == torch.float32 and gs.numel() == 1
    )
