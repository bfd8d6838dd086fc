"""Residual add + RMSNorm followed by hidden-size padding -> one fused kernel.

vLLM 0.26 pads the input of a MoE layer along the hidden dimension when its expert GEMMs want
a multiple of 64/128/256 (``MoERunner._maybe_pad_hidden_states``: gpt-oss with MXFP4 experts
pads 2880 to 2944 or 3072). The post-grad graph then holds::

    y, residual_out = vllm_ir.fused_add_rms_norm(x, residual, weight, eps)
    router_logits   = linear(y, router_weight, router_bias)     # router: unpadded y
    padded          = aten.constant_pad_nd(y, [0, pad], 0.0)    # -> experts

Each such site becomes ``vllm_fusion.fused_add_rms_norm_pad``, which writes the normalized row
straight into the padded tensor (zeros after column H) and residual_out; the other users of
``y`` (the router GEMM) read ``padded[..., :H]``, a strided view of the same values. The
plain ``rms_norm`` form is matched too.

vLLM's own pass (``RocmAiterTritonAddRMSNormPadFusionPass``) runs only on ROCm with AITER, for
hidden size 2880, and also matches the router GEMM. On ROCm with AMD's AITER installed this
pass keeps using AITER's Triton kernel for the fused-add form, as vLLM does; everywhere else
it uses the package's kernel.
"""

from __future__ import annotations

import torch
import torch._inductor.pattern_matcher as pm
import torch.nn.functional as F
import vllm.ir.ops
from vllm.config import VllmConfig

from vllm_fusion.aiter import aiter_available
from vllm_fusion.config import FusionSettings
from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import platform_vendor
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import EPSILONS, fake_value, last_dim_contiguous

logger = init_logger(__name__)

_OPS = torch.ops.vllm_fusion

# Multiples vLLM 0.26's MoE backends round the hidden size up to (fused_moe/oracle/mxfp4.py:
# DeepGEMM / FlashInfer CUTLASS 128, Marlin / TRT-LLM / ROCm 256, the rest 64).
PAD_MULTIPLES = (64, 128, 256)
# vLLM's own pass is written for gpt-oss; used when the model's hidden size is unknown.
GPT_OSS_HIDDEN = 2880
# AITER's fused op, as vLLM 0.26 wraps it (torch.ops.vllm.rocm_aiter_triton_add_rmsnorm_pad).
AITER_PAD_OP = "ops.triton.fused_add_rmsnorm_pad.fused_add_rmsnorm_pad"
_AITER_MULTIPLES = (128, 256)

# Pattern example shapes (any hidden size matches: the pad amount is the pattern's constant).
_TOKENS, _HIDDEN = 5, 16


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def pad_amounts(hidden: int, multiples=PAD_MULTIPLES) -> tuple[int, ...]:
    """The right-pad amounts vLLM's MoE backends can apply to ``hidden``, without 0."""
    return tuple(sorted({round_up(hidden, m) - hidden for m in multiples} - {0}))


def aiter_pad_op(platform: str):
    """vLLM's registration of AITER's fused add + RMSNorm + pad op, where it can run."""
    if platform_vendor(platform) != "rocm" or not aiter_available(AITER_PAD_OP):
        return None
    # vLLM registers it (with its fake) when its AITER ops are enabled.
    return getattr(getattr(torch.ops, "vllm", None), "rocm_aiter_triton_add_rmsnorm_pad", None)


def _aiter_multiple(hidden: int, padded: int) -> int | None:
    """The ``x_pad_to_multiple`` that makes AITER's op produce ``padded`` columns, if any."""
    for multiple in _AITER_MULTIPLES:
        if round_up(hidden, multiple) == padded:
            return multiple
    return None


def _is_all_reduce(node) -> bool:
    all_reduce = getattr(getattr(torch.ops, "vllm", None), "all_reduce", None)
    return (isinstance(node, torch.fx.Node) and all_reduce is not None
            and node.target in (all_reduce, getattr(all_reduce, "default", None)))


class RMSNormPadPattern(FusionPattern):
    """``rms_norm`` or ``fused_add_rms_norm`` (``fused_add``), then ``F.pad(y, (0, pad))``.

    The unpadded ``y`` is also a pattern output, so a site whose ``y`` feeds other nodes (the
    router GEMM) still matches; they get ``padded[..., :H]``.
    """

    def __init__(self, epsilon: float, pad: int, fused_add: bool, dtype: torch.dtype,
                 aiter_op=None, defer_to_allreduce: bool = False):
        self.epsilon = epsilon
        self.pad = pad
        self.fused_add = fused_add
        self.dtype = dtype
        self.aiter_op = aiter_op if fused_add else None
        # fuse_allreduce_rms runs after this pass and also consumes the norm: when it is on, a
        # norm right after an all-reduce is left to it, the larger saving (vLLM's ROCm pass
        # takes such norms for the padding fusion instead).
        self.defer_to_allreduce = defer_to_allreduce

    def describe(self) -> str:
        add = "fused_add_" if self.fused_add else ""
        route = "+aiter" if self.aiter_op is not None else ""
        defer = "/ar" if self.defer_to_allreduce else ""
        return f"{add}rms_norm+pad{self.pad}@eps={self.epsilon}{route}{defer}"

    def extra_check(self, match: pm.Match) -> bool:
        x, weight = fake_value(match, "x"), fake_value(match, "weight")
        if x is None or weight is None:
            return False
        if self.defer_to_allreduce and _is_all_reduce(match.kwargs.get("x")):
            return False
        ok = (
            x.dtype == weight.dtype  # the kernel takes one dtype for both
            and x.dtype in (torch.bfloat16, torch.float16)
            and last_dim_contiguous(x)
        )
        if ok and self.fused_add:
            residual = fake_value(match, "residual")
            ok = residual is not None and residual.dtype == x.dtype and last_dim_contiguous(
                residual)
        return ok

    def get_inputs(self) -> list[torch.Tensor]:
        x = torch.empty(_TOKENS, _HIDDEN, dtype=self.dtype, device="cuda")
        weight = torch.empty(_HIDDEN, dtype=self.dtype, device="cuda")
        return [x, weight, torch.empty_like(x)] if self.fused_add else [x, weight]

    def _pad(self, y: torch.Tensor) -> torch.Tensor:
        # What MoERunner._maybe_pad_hidden_states does.
        return F.pad(y, (0, self.pad), mode="constant", value=0.0)

    @property
    def pattern(self):
        eps = self.epsilon
        if self.fused_add:
            def pattern(x, weight, residual):
                y, residual_out = vllm.ir.ops.fused_add_rms_norm(x, residual, weight, eps)
                return self._pad(y), residual_out, y
        else:
            def pattern(x, weight):
                y = vllm.ir.ops.rms_norm(x, weight, eps)
                return self._pad(y), y
        return pattern

    @property
    def replacement(self):
        eps, pad, aiter_op = self.epsilon, self.pad, self.aiter_op

        if self.fused_add:
            def replacement(x, weight, residual):
                hidden = x.shape[-1]
                multiple = _aiter_multiple(hidden, hidden + pad) if x.dim() == 2 else None
                if aiter_op is not None and multiple is not None:
                    padded, residual_out = aiter_op(
                        x=x, weight=weight, variance_epsilon=eps, residual=residual,
                        x_pad_to_multiple=multiple)
                else:
                    padded, residual_out = _OPS.fused_add_rms_norm_pad(
                        x, residual, weight, eps, hidden + pad)
                return padded, residual_out, padded[..., :hidden]
        else:
            def replacement(x, weight):
                hidden = x.shape[-1]
                padded = _OPS.rms_norm_pad(x, weight, eps, hidden + pad)
                return padded, padded[..., :hidden]
        return replacement


class RMSNormPadFusionPass(FusionPass):
    """``fuse_act_padding``: (residual add +) RMSNorm + hidden-size pad -> one kernel."""

    flag = "fuse_act_padding"
    name = "rmsnorm_pad_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        dtype = self.pattern_dtype()
        aiter_op = aiter_pad_op(settings.platform)
        defer = bool(settings.fusions.get("fuse_allreduce_rms"))
        if aiter_op is not None:
            logger.info_once("vllm_fusion: %s uses AITER's fused add + RMSNorm + pad kernel",
                             self.flag)
        for epsilon in EPSILONS:
            for pad in pad_amounts(self.model_hidden_size(config)):
                # The fused-add form first: it is the larger pattern.
                for fused_add in (True, False):
                    self.register(RMSNormPadPattern(epsilon, pad, fused_add, dtype, aiter_op,
                                                    defer))
        self.dump_patterns(config, self.pm_pass)

    @staticmethod
    def model_hidden_size(config: VllmConfig) -> int:
        try:
            return int(config.model_config.get_hidden_size())
        except Exception:  # no model config (unit tests of the pass alone)
            return GPT_OSS_HIDDEN
