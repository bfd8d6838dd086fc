"""RMSNorm (+ residual add) followed by FP8 or NVFP4 quantization -> one fused kernel.

Matches what vLLM 0.26 emits: the unlowered ``vllm_ir.rms_norm`` /
``vllm_ir.fused_add_rms_norm`` node followed by ``QuantFP8`` as a custom op or in
native torch (whichever the model's ``custom_ops`` produce), for static
per-tensor, dynamic per-token and dynamic per-group (64/128) scales, or by
``scaled_fp4_quant`` (NVFP4 with swizzled block scales, SM100; vLLM 0.26 has no
fusion of its own for it). Each site becomes one ``torch.ops.vllm_fusion.*`` call
that reads the input once and writes the quantized output (and the new residual)
once.
"""

from __future__ import annotations

import functools

import torch
import torch._inductor.pattern_matcher as pm
import vllm.ir.ops
from vllm.config import VllmConfig

from vllm_fusion.config import FusionSettings
from vllm_fusion.ops import checks
from vllm_fusion.ops.fp8 import check_dynamic_args
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import (
    EPSILONS,
    NVFP4,
    FP8Scheme,
    fake_value,
    last_dim_contiguous,
    nvfp4_buffers_ok,
    nvfp4_example_buffers,
    nvfp4_quantize,
)

_OPS = torch.ops.vllm_fusion

# Pattern example shapes: the hidden size must be a multiple of every group size.
_TOKENS, _HIDDEN = 5, 256


class RMSNormQuantPattern(FusionPattern):
    """``rms_norm`` or ``fused_add_rms_norm`` (``fused_add``) then ``scheme``."""

    def __init__(self, epsilon: float, scheme: FP8Scheme, fused_add: bool, dtype: torch.dtype):
        self.epsilon = epsilon
        self.scheme = scheme
        self.fused_add = fused_add
        self.dtype = dtype
        self.quant = scheme.matcher()

    def describe(self) -> str:
        add = "fused_add_" if self.fused_add else ""
        return f"{add}rms_norm+{self.scheme}@eps={self.epsilon}"

    def extra_check(self, match: pm.Match) -> bool:
        """Fuse only inputs the kernel accepts: it checks them exactly like this."""
        x, weight = fake_value(match, "x"), fake_value(match, "weight")
        residual = fake_value(match, "residual") if self.fused_add else None
        scale = fake_value(match, "scale") if self.scheme.static else None
        if x is None or weight is None or (self.fused_add and residual is None) or (
            self.scheme.static and scale is None
        ):
            return False
        return checks.accepts(self._check_kernel_inputs, x, residual, weight, scale)

    def _check_kernel_inputs(self, x, residual, weight, scale) -> None:
        op = "fused_add_rms_norm_quant" if self.fused_add else "rms_norm_quant"
        checks.check_norm_args(op, x, residual, weight)
        if scale is not None:
            checks.check_scale_scalar(op, "scale", scale, x)
        else:
            group, transposed, e8m0 = self.scheme.op_args(self.quant)
            check_dynamic_args(x.shape[-1], group, transposed, e8m0, x.dim())

    def get_inputs(self) -> list[torch.Tensor]:
        x = torch.empty(_TOKENS, _HIDDEN, dtype=self.dtype, device="cuda")
        weight = torch.empty(_HIDDEN, dtype=self.dtype, device="cuda")
        inputs = [x, weight]
        if self.fused_add:
            inputs.append(torch.empty_like(x))
        if self.scheme.static:
            inputs.append(torch.empty(1, 1, dtype=torch.float32, device="cuda"))
        return inputs

    def _norm(self, x, weight, residual=None):
        if self.fused_add:
            return vllm.ir.ops.fused_add_rms_norm(x, residual, weight, self.epsilon)
        return vllm.ir.ops.rms_norm(x, weight, self.epsilon), None

    @property
    def pattern(self):
        fused_add, static = self.fused_add, self.scheme.static

        quantize = functools.partial(self.scheme.quantize, self.quant)

        if static and fused_add:
            def pattern(x, weight, residual, scale):
                y, residual_out = self._norm(x, weight, residual)
                return quantize(y, scale)[0], residual_out
        elif static:
            def pattern(x, weight, scale):
                y, _ = self._norm(x, weight)
                return quantize(y, scale)[0]
        elif fused_add:
            def pattern(x, weight, residual):
                y, residual_out = self._norm(x, weight, residual)
                q, scales = quantize(y)
                return q, residual_out, scales
        else:
            def pattern(x, weight):
                y, _ = self._norm(x, weight)
                return quantize(y)

        return pattern

    @property
    def replacement(self):
        eps, fused_add, scheme = self.epsilon, self.fused_add, self.scheme
        group, col, e8m0 = scheme.op_args(self.quant)
        outputs = functools.partial(scheme.fused_outputs, self.quant)

        if scheme.static and fused_add:
            def replacement(x, weight, residual, scale):
                return _OPS.fused_add_rms_norm_static_fp8_quant(x, residual, weight, scale, eps)
        elif scheme.static:
            def replacement(x, weight, scale):
                return _OPS.rms_norm_static_fp8_quant(x, weight, scale, eps)
        elif fused_add:
            def replacement(x, weight, residual):
                q, residual_out, scales = _OPS.fused_add_rms_norm_dynamic_fp8_quant(
                    x, residual, weight, eps, group, col, e8m0, None
                )
                q, scales = outputs(q, scales)
                return q, residual_out, scales
        else:
            def replacement(x, weight):
                q, scales = _OPS.rms_norm_dynamic_fp8_quant(x, weight, eps, group, col, e8m0, None)
                return outputs(q, scales)

        return replacement


def _norm_operands_ok(match: pm.Match) -> tuple[bool, int]:
    """(the kernel takes x and weight, hidden size)."""
    x, weight = fake_value(match, "x"), fake_value(match, "weight")
    if x is None or weight is None:
        return False, 0
    ok = (
        x.dtype == weight.dtype  # the kernel takes one dtype for both
        and x.dtype in (torch.bfloat16, torch.float16)
        and last_dim_contiguous(x)
    )
    return ok, x.shape[-1]


class RMSNormNvfp4QuantPattern(FusionPattern):
    """``rms_norm`` or ``fused_add_rms_norm`` (``fused_add``) then ``scaled_fp4_quant``."""

    def __init__(self, epsilon: float, fused_add: bool, dtype: torch.dtype):
        self.epsilon = epsilon
        self.fused_add = fused_add
        self.dtype = dtype

    def describe(self) -> str:
        add = "fused_add_" if self.fused_add else ""
        return f"{add}rms_norm+{NVFP4}@eps={self.epsilon}"

    def extra_check(self, match: pm.Match) -> bool:
        ok, hidden = _norm_operands_ok(match)
        return ok and nvfp4_buffers_ok(match, hidden)

    def get_inputs(self) -> list[torch.Tensor]:
        x = torch.empty(_TOKENS, _HIDDEN, dtype=self.dtype, device="cuda")
        weight = torch.empty(_HIDDEN, dtype=self.dtype, device="cuda")
        global_scale = torch.empty(1, dtype=torch.float32, device="cuda")
        residual = [torch.empty_like(x)] if self.fused_add else []
        return [x, weight, *residual, global_scale,
                *nvfp4_example_buffers(_TOKENS, _HIDDEN)]

    @property
    def pattern(self):
        eps = self.epsilon
        if self.fused_add:
            def pattern(x, weight, residual, global_scale, output, output_scale):
                y, residual_out = vllm.ir.ops.fused_add_rms_norm(x, residual, weight, eps)
                q, scales = nvfp4_quantize(y, global_scale, output, output_scale)
                return q, residual_out, scales
        else:
            def pattern(x, weight, global_scale, output, output_scale):
                y = vllm.ir.ops.rms_norm(x, weight, eps)
                return nvfp4_quantize(y, global_scale, output, output_scale)
        return pattern

    @property
    def replacement(self):
        eps = self.epsilon
        if self.fused_add:
            def replacement(x, weight, residual, global_scale, output, output_scale):
                return _OPS.fused_add_rms_norm_nvfp4_quant(x, residual, weight, global_scale, eps)
        else:
            def replacement(x, weight, global_scale, output, output_scale):
                return _OPS.rms_norm_nvfp4_quant(x, weight, global_scale, eps)
        return replacement


class RMSNormQuantFusionPass(FusionPass):
    """``fuse_norm_quant``: RMSNorm (+residual) + FP8 / NVFP4 quant -> one kernel."""

    flag = "fuse_norm_quant"
    name = "rmsnorm_quant_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        dtype = self.pattern_dtype()
        for epsilon in EPSILONS:
            for scheme in self.schemes():
                # The fused-add form first: it is the larger pattern.
                for fused_add in (True, False):
                    self.register(RMSNormQuantPattern(epsilon, scheme, fused_add, dtype))
            if self.fuses_nvfp4():
                for fused_add in (True, False):
                    self.register(RMSNormNvfp4QuantPattern(epsilon, fused_add, dtype))
        self.dump_patterns(config, self.pm_pass)
