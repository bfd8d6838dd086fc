"""SiLU-and-Mul followed by FP8 or NVFP4 quantization -> one fused kernel.

Matches ``SiluAndMul`` as vLLM's custom op or in native torch, followed by
``QuantFP8`` (custom or native): static per-tensor, dynamic per-token (which
vLLM 0.26 has no fused kernel for) and dynamic per-group (64/128); or followed
by ``scaled_fp4_quant`` (NVFP4, SM100), where the fused op computes the SiLU*Mul
exactly as the unfused graph does (vLLM's own ``silu_and_mul_nvfp4_quant`` skips
the rounding of SiLU to the activation dtype).
"""

from __future__ import annotations

import functools

import torch
import torch._inductor.pattern_matcher as pm
from vllm.compilation.passes.fusion.matcher_utils import MatcherSiluAndMul
from vllm.config import VllmConfig

from vllm_fusion.config import FusionSettings
from vllm_fusion.ops import checks
from vllm_fusion.ops.fp8 import check_dynamic_args
from vllm_fusion.passes.base import FusionPass, FusionPattern
from vllm_fusion.passes.quant_schemes import (
    NVFP4,
    NVFP4_BLOCK,
    FP8Scheme,
    fake_value,
    last_dim_contiguous,
    nvfp4_buffers_ok,
    nvfp4_example_buffers,
    nvfp4_quantize,
)

_OPS = torch.ops.vllm_fusion

# Pattern example shape: [tokens, 2 * d] with d a multiple of every group size.
_TOKENS, _WIDTH = 5, 512


class SiluMulQuantPattern(FusionPattern):
    def __init__(self, scheme: FP8Scheme, dtype: torch.dtype):
        self.scheme = scheme
        self.dtype = dtype
        self.silu_mul = MatcherSiluAndMul()
        self.quant = scheme.matcher()

    def describe(self) -> str:
        return f"silu_and_mul+{self.scheme}"

    def extra_check(self, match: pm.Match) -> bool:
        """Fuse only inputs the kernel accepts: it checks them exactly like this."""
        x = fake_value(match, "x")
        scale = fake_value(match, "scale") if self.scheme.static else None
        if x is None or (self.scheme.static and scale is None):
            return False
        return checks.accepts(self._check_kernel_inputs, x, scale)

    def _check_kernel_inputs(self, x, scale) -> None:
        op = "silu_and_mul_quant"
        checks.check_act_input(op, x)
        if scale is not None:
            checks.check_scale_scalar(op, "scale", scale, x)
        else:
            group, transposed, e8m0 = self.scheme.op_args(self.quant)
            check_dynamic_args(x.shape[-1] // 2, group, transposed, e8m0, x.dim())

    def get_inputs(self) -> list[torch.Tensor]:
        inputs = [torch.empty(_TOKENS, _WIDTH, dtype=self.dtype, device="cuda")]
        if self.scheme.static:
            inputs.append(torch.empty(1, 1, dtype=torch.float32, device="cuda"))
        return inputs

    @property
    def pattern(self):
        quantize = functools.partial(self.scheme.quantize, self.quant)
        if self.scheme.static:
            def pattern(x, scale):
                return quantize(self.silu_mul(x), scale)[0]
        else:
            def pattern(x):
                return quantize(self.silu_mul(x))
        return pattern

    @property
    def replacement(self):
        scheme = self.scheme
        if scheme.static:
            def replacement(x, scale):
                return _OPS.silu_and_mul_static_fp8_quant(x, scale)
        else:
            group, col, e8m0 = scheme.op_args(self.quant)
            outputs = functools.partial(scheme.fused_outputs, self.quant)

            def replacement(x):
                return outputs(*_OPS.silu_and_mul_dynamic_fp8_quant(x, group, col, e8m0, None))
        return replacement


def _silu_input_ok(x: torch.Tensor | None, block: int) -> bool:
    return (
        x is not None
        and x.dtype in (torch.bfloat16, torch.float16)
        and last_dim_contiguous(x)
        and x.shape[-1] % 2 == 0
        and (x.shape[-1] // 2) % block == 0
    )


class SiluMulNvfp4QuantPattern(FusionPattern):
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.silu_mul = MatcherSiluAndMul()

    def describe(self) -> str:
        return f"silu_and_mul+{NVFP4}"

    def extra_check(self, match: pm.Match) -> bool:
        x = fake_value(match, "x")
        return _silu_input_ok(x, NVFP4_BLOCK) and nvfp4_buffers_ok(match, x.shape[-1] // 2)

    def get_inputs(self) -> list[torch.Tensor]:
        x = torch.empty(_TOKENS, _WIDTH, dtype=self.dtype, device="cuda")
        global_scale = torch.empty(1, dtype=torch.float32, device="cuda")
        return [x, global_scale, *nvfp4_example_buffers(_TOKENS, _WIDTH // 2)]

    @property
    def pattern(self):
        def pattern(x, global_scale, output, output_scale):
            return nvfp4_quantize(self.silu_mul(x), global_scale, output, output_scale)
        return pattern

    @property
    def replacement(self):
        def replacement(x, global_scale, output, output_scale):
            return _OPS.silu_and_mul_nvfp4_quant(x, global_scale)
        return replacement


class ActivationQuantFusionPass(FusionPass):
    """``fuse_act_quant``: SiLU*Mul + FP8 / NVFP4 quant -> one kernel."""

    flag = "fuse_act_quant"
    name = "activation_quant_fusion_pass"

    def __init__(self, config: VllmConfig, settings: FusionSettings):
        super().__init__(config, settings)
        dtype = self.pattern_dtype()
        for scheme in self.schemes():
            self.register(SiluMulQuantPattern(scheme, dtype))
        if self.fuses_nvfp4():
            self.register(SiluMulNvfp4QuantPattern(dtype))
        self.dump_patterns(config, self.pm_pass)
