"""Small models built from vLLM's own layers, shaped like a Llama decoder's
norm / quant / MLP sites, for pattern-matching tests."""

from __future__ import annotations

import torch

# Quantization schemes by name: (static, group shape name, column-major scales)
SCHEMES = {
    "fp8-static": (True, "PER_TENSOR", False),
    "fp8-per-token": (False, "PER_TOKEN", False),
    "fp8-group128": (False, (1, 128), False),
    "fp8-group128-colmajor": (False, (1, 128), True),
    "fp8-group64": (False, (1, 64), False),
    "fp8-group64-colmajor": (False, (1, 64), True),
    # NVFP4 linear layers: vllm._custom_ops.scaled_fp4_quant with a global scale.
    "nvfp4": (False, None, False),
}


def make_quant(scheme: str):
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    static, shape, column_major = SCHEMES[scheme]
    group_shape = getattr(GroupShape, shape) if isinstance(shape, str) else GroupShape(*shape)
    return QuantFP8(
        static=static, group_shape=group_shape, column_major_scales=column_major, use_ue8m0=False
    )


class QuantizedDecoderStack(torch.nn.Module):
    """``num_layers`` Llama decoder layers reduced to their fusion sites.

    Per layer: input RMSNorm -> quant -> GEMM (attention stand-in), residual add
    + RMSNorm -> quant -> gate_up GEMM -> SiLU*Mul -> quant -> down GEMM. That is
    two norm+quant sites and one SiLU+quant site per layer. GEMMs are stand-ins
    (dequantize, matmul) because only the sites around them matter here.
    """

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, eps: float,
                 scheme: str, num_layers: int = 2, norm_dtype: torch.dtype | None = None,
                 fp4_pad: int = 0):
        super().__init__()
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.layernorm import RMSNorm

        self.dtype = dtype
        self.static = SCHEMES[scheme][0]
        self.num_layers = num_layers
        # vLLM's fusions skip norms whose weight dtype differs from the input's.
        self.norms = torch.nn.ModuleList(
            RMSNorm(hidden, eps=eps, dtype=norm_dtype or dtype) for _ in range(2 * num_layers + 1)
        )
        self.nvfp4 = scheme == "nvfp4"
        # NVFP4: quantize into buffers padded by this many columns (scaled_fp4_quant's padded_n).
        self.fp4_pad = fp4_pad
        self.quant = None if self.nvfp4 else make_quant(scheme)
        self.act = SiluAndMul()
        self.w_attn = torch.nn.Parameter(torch.randn(hidden, hidden, dtype=dtype), False)
        self.w_up = torch.nn.Parameter(torch.randn(hidden, 2 * intermediate, dtype=dtype), False)
        self.w_down = torch.nn.Parameter(torch.randn(intermediate, hidden, dtype=dtype), False)
        self.scale = torch.nn.Parameter(torch.rand(1, dtype=torch.float32) + 0.5, False)

    def quantize(self, x: torch.Tensor):
        if self.nvfp4:
            from vllm import _custom_ops as ops

            padded_n = x.shape[-1] + self.fp4_pad if self.fp4_pad else None
            return ops.scaled_fp4_quant(x, self.scale, padded_n=padded_n)
        return self.quant(x, self.scale) if self.static else self.quant(x)

    def gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize(x)
        if self.nvfp4:  # two e2m1 values per byte: the stand-in multiplies the bytes
            weight = weight[: q.shape[-1]]
        return (q.to(self.dtype) @ weight) * scale.to(self.dtype).amax()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in range(self.num_layers):
            norm_in, norm_post = self.norms[2 * layer], self.norms[2 * layer + 1]
            if residual is None:
                residual = hidden_states
                hidden_states = norm_in(hidden_states)
            else:
                hidden_states, residual = norm_in(hidden_states, residual)
            hidden_states = self.gemm(hidden_states, self.w_attn)
            hidden_states, residual = norm_post(hidden_states, residual)
            hidden_states = self.gemm(hidden_states, self.w_up)
            hidden_states = self.gemm(self.act(hidden_states), self.w_down)
        hidden_states, _ = self.norms[-1](hidden_states, residual)
        return hidden_states
