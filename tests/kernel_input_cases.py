"""Bad inputs for every op of torch.ops.vllm_fusion and the message each must raise.

Shared by the CPU test of the fake impls (tests/cpu/test_kernel_input_checks.py) and the GPU
test of the kernels (tests/gpu/test_kernel_input_checks.py): the kernel and its fake must
reject the same inputs with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class BadCall:
    id: str
    op: str
    # device -> the op's arguments
    args: Callable[[str], tuple]
    message: str


def _t(device: str, *shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _scale(device: str, dtype: torch.dtype = FP32, n: int = 1) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


BAD_CALLS: tuple[BadCall, ...] = (
    BadCall("norm-input-fp32", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256, dtype=FP32), _t(d, 256, dtype=FP32), _scale(d), 1e-6),
            "input must be bfloat16 or float16, got float32"),
    BadCall("norm-input-strided", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 512)[:, ::2], _t(d, 256), _scale(d), 1e-6),
            "input must be contiguous in its last dimension (stride(-1) == 1), got stride 2"),
    BadCall("norm-weight-size", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 128), _scale(d), 1e-6),
            "weight must be 1-D of size 256 (the last dim of input)"),
    BadCall("norm-weight-dtype", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 256, dtype=FP16), _scale(d), 1e-6),
            "weight must have the same dtype as input (bfloat16), got float16"),
    BadCall("norm-weight-strided", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 512)[::2], _scale(d), 1e-6),
            "weight must be contiguous"),
    BadCall("norm-scale-dtype", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 256), _scale(d, BF16), 1e-6),
            "scale must be a float32 tensor, got bfloat16"),
    BadCall("norm-scale-numel", "rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 256), _scale(d, n=2), 1e-6),
            "scale must have exactly 1 element, got 2"),
    BadCall("add-norm-residual-shape", "fused_add_rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 3, 256), _t(d, 256), _scale(d), 1e-6),
            "residual must have the same shape as input"),
    BadCall("add-norm-residual-dtype", "fused_add_rms_norm_static_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 4, 256, dtype=FP16), _t(d, 256), _scale(d), 1e-6),
            "residual must have the same dtype as input (bfloat16), got float16"),
    BadCall("norm-group-not-dividing", "rms_norm_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 200), _t(d, 200), 1e-6, 128, False, False, None),
            "hidden size 200 (last dim of the quantized output) must be divisible by "
            "group_size 128"),
    BadCall("norm-group-size", "rms_norm_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 256), 1e-6, 32, False, False, None),
            "group_size must be 0 (per-token scales), 64 or 128, got 32"),
    BadCall("norm-ue8m0-per-token", "fused_add_rms_norm_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 4, 256), _t(d, 256), 1e-6, 0, False, True, None),
            "scale_ue8m0=True requires group_size 64 or 128 (per-group scales)"),
    BadCall("norm-transposed-1d", "rms_norm_dynamic_fp8_quant",
            lambda d: (_t(d, 256), _t(d, 256), 1e-6, 128, True, False, None),
            "scale_transposed=True requires an input of at least 2 dimensions"),
    BadCall("norm-scale-ub-dtype", "rms_norm_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 256), _t(d, 256), 1e-6, 0, False, False, _scale(d, FP16)),
            "scale_ub must be a float32 tensor, got float16"),
    BadCall("silu-odd-width", "silu_and_mul_static_fp8_quant",
            lambda d: (_t(d, 4, 255), _scale(d)),
            "input last dim must be even ([gate | up] halves), got 255"),
    BadCall("silu-input-fp32", "silu_and_mul_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 512, dtype=FP32), 0, False, False, None),
            "input must be bfloat16 or float16, got float32"),
    BadCall("silu-empty-width", "silu_and_mul_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 0), 0, False, False, None),
            "input must have a non-empty last dimension"),
    BadCall("silu-group-not-dividing", "silu_and_mul_dynamic_fp8_quant",
            lambda d: (_t(d, 4, 400), 128, False, False, None),
            "hidden size 200 (last dim of the quantized output) must be divisible by "
            "group_size 128"),
    BadCall("silu-scale-numel", "silu_and_mul_static_fp8_quant",
            lambda d: (_t(d, 4, 512), _scale(d, n=4)),
            "scale must have exactly 1 element, got 4"),
    BadCall("pad-narrower-than-hidden", "rms_norm_pad",
            lambda d: (_t(d, 4, 256), _t(d, 256), 1e-6, 128),
            "padded_hidden must be at least the hidden size 256 (the last dim of input), got 128"),
    BadCall("pad-weight-size", "rms_norm_pad",
            lambda d: (_t(d, 4, 256), _t(d, 128), 1e-6, 384),
            "weight must be 1-D of size 256 (the last dim of input)"),
    BadCall("add-pad-residual-dtype", "fused_add_rms_norm_pad",
            lambda d: (_t(d, 4, 256), _t(d, 4, 256, dtype=FP16), _t(d, 256), 1e-6, 384),
            "residual must have the same dtype as input (bfloat16), got float16"),
    # NVFP4: these input checks come before the kernel's SM100 check, so any GPU raises them.
    BadCall("nvfp4-norm-width", "rms_norm_nvfp4_quant",
            lambda d: (_t(d, 4, 200), _t(d, 200), _scale(d), 1e-6),
            "NVFP4 quantizes blocks of 16 elements: hidden size (last dim of input) (200) must "
            "be a multiple of 16"),
    BadCall("nvfp4-add-norm-global-scale-dtype", "fused_add_rms_norm_nvfp4_quant",
            lambda d: (_t(d, 4, 256), _t(d, 4, 256), _t(d, 256), _scale(d, BF16), 1e-6),
            "global_scale must be a float32 tensor, got bfloat16"),
    BadCall("nvfp4-silu-width", "silu_and_mul_nvfp4_quant",
            lambda d: (_t(d, 4, 48), _scale(d)),
            "NVFP4 quantizes blocks of 16 elements: output width (half the last dim of input) "
            "(24) must be a multiple of 16"),
)


# One valid call per op that runs on any GPU, for tests that only need the op to run.
VALID_CALLS: dict[str, Callable[[str], tuple]] = {
    "rms_norm_static_fp8_quant": lambda d: (_t(d, 4, 256), _t(d, 256), _scale(d), 1e-6),
    "fused_add_rms_norm_static_fp8_quant":
        lambda d: (_t(d, 4, 256), _t(d, 4, 256), _t(d, 256), _scale(d), 1e-6),
    "rms_norm_dynamic_fp8_quant":
        lambda d: (_t(d, 4, 256), _t(d, 256), 1e-6, 128, True, True, None),
    "fused_add_rms_norm_dynamic_fp8_quant":
        lambda d: (_t(d, 4, 256), _t(d, 4, 256), _t(d, 256), 1e-6, 0, False, False, _scale(d)),
    "silu_and_mul_static_fp8_quant": lambda d: (_t(d, 4, 512), _scale(d)),
    "silu_and_mul_dynamic_fp8_quant": lambda d: (_t(d, 4, 512), 64, False, False, None),
    "rms_norm_pad": lambda d: (_t(d, 4, 2880), _t(d, 2880), 1e-6, 3072),
    "fused_add_rms_norm_pad": lambda d: (_t(d, 4, 2880), _t(d, 4, 2880), _t(d, 2880), 1e-6, 3072),
}
# (The NVFP4 ops are left out: they run on SM100 only, tests/gpu/test_nvfp4_kernels.py.)
