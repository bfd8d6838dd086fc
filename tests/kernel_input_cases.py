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




# qk_norm_rope_kv_cache: 5 tokens, 4 q heads, 2 kv heads, head size 128, rotary dim 128.
def _rope(d: str, **over) -> tuple:
    """Arguments of a valid qk_norm_rope_kv_cache call with a bf16 cache, ``over`` replacing
    some (by parameter name)."""
    args = dict(
        query=_t(d, 5, 4, 128), key=_t(d, 5, 2, 128), value=_t(d, 5, 2, 128),
        positions=torch.arange(5, device=d), cos_sin_cache=_t(d, 64, 128, dtype=FP32),
        is_neox=True, q_weight=_t(d, 128), k_weight=_t(d, 128), epsilon=1e-6,
        key_cache=_t(d, 3, 16, 2, 128), value_cache=_t(d, 3, 16, 2, 128),
        slot_mapping=torch.arange(5, device=d), k_scale=None, v_scale=None,
    )
    args.update(over)
    return tuple(args.values())


def _fp8_cache(d: str, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float8_e4m3fn, device=d)


ROPE = "qk_norm_rope_kv_cache"
BAD_CALLS += (
    BadCall("rope-query-fp32", ROPE, lambda d: _rope(d, query=_t(d, 5, 4, 128, dtype=FP32)),
            "query must be bfloat16 or float16, got float32"),
    BadCall("rope-query-2d", ROPE, lambda d: _rope(d, query=_t(d, 5, 512)),
            "query must be 3-D [num_tokens, num_heads, head_size], got 2-D"),
    BadCall("rope-query-strided", ROPE, lambda d: _rope(d, query=_t(d, 5, 4, 256)[..., ::2]),
            "query must be contiguous in its last dimension (stride(-1) == 1), got stride 2"),
    BadCall("rope-head-size-too-large", ROPE,
            lambda d: _rope(d, query=_t(d, 5, 1, 640), key=_t(d, 5, 1, 640),
                            cos_sin_cache=_t(d, 64, 128, dtype=FP32), q_weight=None,
                            k_weight=None, key_cache=None, value_cache=None),
            "head size (query.size(2)) must be at most 512, got 640"),
    BadCall("rope-key-dtype", ROPE, lambda d: _rope(d, key=_t(d, 5, 2, 128, dtype=FP16)),
            "key must have the same dtype as query (bfloat16), got float16"),
    BadCall("rope-key-tokens", ROPE, lambda d: _rope(d, key=_t(d, 4, 2, 128)),
            "key must have 5 tokens (query.size(0)), got 4"),
    BadCall("rope-key-head-size", ROPE, lambda d: _rope(d, key=_t(d, 5, 2, 64)),
            "key must have the head size of query (128), got 64"),
    BadCall("rope-positions-dtype", ROPE,
            lambda d: _rope(d, positions=torch.zeros(5, dtype=FP32, device=d)),
            "positions must be int64 or int32, got float32"),
    BadCall("rope-positions-length", ROPE,
            lambda d: _rope(d, positions=torch.arange(6, device=d)),
            "positions must be 1-D with one entry per token (5)"),
    BadCall("rope-cos-sin-dtype", ROPE,
            lambda d: _rope(d, cos_sin_cache=torch.zeros(64, 128, dtype=torch.float64, device=d)),
            "cos_sin_cache must be float32, bfloat16 or float16, got float64"),
    BadCall("rope-rot-odd", ROPE, lambda d: _rope(d, cos_sin_cache=_t(d, 64, 63, dtype=FP32)),
            "rotary_dim (cos_sin_cache.size(1)) must be even and in [2, head size 128], got 63"),
    BadCall("rope-rot-too-wide", ROPE,
            lambda d: _rope(d, cos_sin_cache=_t(d, 64, 256, dtype=FP32)),
            "rotary_dim (cos_sin_cache.size(1)) must be even and in [2, head size 128], got 256"),
    BadCall("rope-cos-sin-strided", ROPE,
            lambda d: _rope(d, cos_sin_cache=_t(d, 64, 256, dtype=FP32)[:, :128]),
            "cos_sin_cache must be contiguous"),
    BadCall("rope-one-weight", ROPE, lambda d: _rope(d, k_weight=None),
            "q_weight and k_weight must be given together (both or neither)"),
    BadCall("rope-weight-size", ROPE, lambda d: _rope(d, q_weight=_t(d, 64)),
            "q_weight must be 1-D of size 128 (the head size)"),
    BadCall("rope-weight-dtype", ROPE, lambda d: _rope(d, k_weight=_t(d, 128, dtype=FP32)),
            "k_weight must have the same dtype as query (bfloat16), got float32"),
    BadCall("rope-one-cache", ROPE, lambda d: _rope(d, value_cache=None),
            "key_cache and value_cache must be given together (both or neither)"),
    BadCall("rope-value-heads", ROPE, lambda d: _rope(d, value=_t(d, 5, 3, 128)),
            "value must have the 2 heads of key, got 3"),
    BadCall("rope-cache-shape", ROPE, lambda d: _rope(d, key_cache=_t(d, 3, 16, 4, 128)),
            "key_cache must have shape [num_blocks, block_size, 2, 128], got [3, 16, 4, 128]"),
    BadCall("rope-cache-3d", ROPE, lambda d: _rope(d, value_cache=_t(d, 48, 2, 128)),
            "value_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got 3-D"),
    BadCall("rope-cache-strided", ROPE,
            lambda d: _rope(d, key_cache=_t(d, 3, 16, 2, 256)[..., ::2]),
            "key_cache must be contiguous in its last dimension (stride(-1) == 1), got stride 2"),
    BadCall("rope-cache-dtype", ROPE,
            lambda d: _rope(d, key_cache=_t(d, 3, 16, 2, 128, dtype=FP16)),
            "key_cache must have the dtype of query (bfloat16) or be fp8 (float8_e4m3fn, "
            "float8_e4m3fnuz or uint8), got float16"),
    BadCall("rope-cache-dtypes-differ", ROPE,
            lambda d: _rope(d, value_cache=_fp8_cache(d, 3, 16, 2, 128)),
            "value_cache must have the dtype of key_cache (bfloat16), got float8_e4m3fn"),
    BadCall("rope-cache-blocks-differ", ROPE, lambda d: _rope(d, value_cache=_t(d, 3, 32, 2, 128)),
            "value_cache must have the num_blocks and block_size of key_cache"),
    BadCall("rope-no-slot-mapping", ROPE, lambda d: _rope(d, slot_mapping=None),
            "slot_mapping must be given with the caches"),
    BadCall("rope-slot-mapping-int32", ROPE,
            lambda d: _rope(d, slot_mapping=torch.arange(5, dtype=torch.int32, device=d)),
            "slot_mapping must be int64, got int32"),
    BadCall("rope-slot-mapping-too-long", ROPE,
            lambda d: _rope(d, slot_mapping=torch.arange(6, device=d)),
            "slot_mapping must be 1-D with at most 5 entries (one per token), got 6"),
    BadCall("rope-fp8-no-scales", ROPE,
            lambda d: _rope(d, key_cache=_fp8_cache(d, 3, 16, 2, 128),
                            value_cache=_fp8_cache(d, 3, 16, 2, 128)),
            "an fp8 key_cache / value_cache needs k_scale and v_scale"),
    BadCall("rope-fp8-scale-numel", ROPE,
            lambda d: _rope(d, key_cache=_fp8_cache(d, 3, 16, 2, 128),
                            value_cache=_fp8_cache(d, 3, 16, 2, 128), k_scale=_scale(d),
                            v_scale=_scale(d, n=2)),
            "v_scale must have exactly 1 element, got 2"),
)


# all_reduce_rms_norm: 4 tokens, hidden 256, TP2 rank 0, 16 KiB workspace halves. The buffer
# addresses are never dereferenced: every case below fails a check before any launch.
def _all_reduce(d: str, **over) -> tuple:
    """Arguments of a valid all_reduce_rms_norm call, ``over`` replacing some (by name)."""
    args = dict(
        input=_t(d, 4, 256), residual=_t(d, 4, 256), weight=_t(d, 256), epsilon=1e-6,
        scale=None, buffers=[1 << 20, 2 << 20],
        counter=torch.zeros(2, dtype=torch.int64, device=d), rank=0, capacity=16384,
        two_shot=False, push=False,
    )
    args.update(over)
    return tuple(args.values())


AR = "all_reduce_rms_norm"
BAD_CALLS += (
    BadCall("ar-input-fp32", AR,
            lambda d: _all_reduce(d, input=_t(d, 4, 256, dtype=FP32), residual=None,
                                  weight=_t(d, 256, dtype=FP32)),
            "input must be bfloat16 or float16, got float32"),
    BadCall("ar-input-not-contiguous", AR,
            lambda d: _all_reduce(d, input=_t(d, 8, 256)[::2]),
            "input must be contiguous"),
    BadCall("ar-residual-not-contiguous", AR,
            lambda d: _all_reduce(d, residual=_t(d, 8, 256)[::2]),
            "residual must be contiguous"),
    BadCall("ar-residual-shape", AR, lambda d: _all_reduce(d, residual=_t(d, 3, 256)),
            "residual must have the same shape as input"),
    BadCall("ar-weight-dtype", AR, lambda d: _all_reduce(d, weight=_t(d, 256, dtype=FP16)),
            "weight must have the same dtype as input (bfloat16), got float16"),
    BadCall("ar-scale-dtype", AR, lambda d: _all_reduce(d, scale=_scale(d, BF16)),
            "scale must be a float32 tensor, got bfloat16"),
    BadCall("ar-hidden-not-multiple-of-8", AR,
            lambda d: _all_reduce(d, input=_t(d, 4, 204), residual=_t(d, 4, 204),
                                  weight=_t(d, 204)),
            "the last dim of input must be a multiple of 8 and at most 16384, got 204"),
    BadCall("ar-hidden-too-large", AR,
            lambda d: _all_reduce(d, input=_t(d, 1, 16392), residual=None,
                                  weight=_t(d, 16392), capacity=1 << 16),
            "the last dim of input must be a multiple of 8 and at most 16384, got 16392"),
    BadCall("ar-one-buffer", AR, lambda d: _all_reduce(d, buffers=[1 << 20]),
            "buffers must hold one address per rank, 2 to 8 ranks, got 1"),
    BadCall("ar-nine-buffers", AR,
            lambda d: _all_reduce(d, buffers=[(i + 1) << 20 for i in range(9)]),
            "buffers must hold one address per rank, 2 to 8 ranks, got 9"),
    BadCall("ar-rank-out-of-range", AR, lambda d: _all_reduce(d, rank=2),
            "rank must be in [0, 2), got 2"),
    BadCall("ar-negative-rank", AR, lambda d: _all_reduce(d, rank=-1),
            "rank must be in [0, 2), got -1"),
    BadCall("ar-unaligned-buffer", AR, lambda d: _all_reduce(d, buffers=[1 << 20, (2 << 20) + 8]),
            "every buffer address must be 16-byte aligned"),
    BadCall("ar-null-buffer", AR, lambda d: _all_reduce(d, buffers=[1 << 20, 0]),
            "every buffer address must be 16-byte aligned"),
    BadCall("ar-capacity-unaligned", AR, lambda d: _all_reduce(d, capacity=1000),
            "capacity must be a positive multiple of 16 bytes, got 1000"),
    BadCall("ar-counter-dtype", AR,
            lambda d: _all_reduce(d, counter=torch.zeros(2, dtype=torch.int32, device=d)),
            "counter must be an int64 tensor of at least 2 elements"),
    BadCall("ar-counter-one-element", AR,
            lambda d: _all_reduce(d, counter=torch.zeros(1, dtype=torch.int64, device=d)),
            "counter must be an int64 tensor of at least 2 elements"),
    BadCall("ar-capacity-too-small", AR,
            lambda d: _all_reduce(d, input=_t(d, 40, 256), residual=_t(d, 40, 256)),
            "40 x 256 elements do not fit the workspace (16384 bytes)"),
    BadCall("ar-push-two-shot", AR, lambda d: _all_reduce(d, two_shot=True, push=True),
            "push is a one-shot algorithm; two_shot must be False"),
    BadCall("ar-push-no-room-per-rank", AR,
            lambda d: _all_reduce(d, input=_t(d, 20, 256), residual=_t(d, 20, 256), push=True),
            "push needs one slot per rank: 2 x 20 x 256 elements do not fit the workspace "
            "(16384 bytes)"),
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
    "qk_norm_rope_kv_cache": lambda d: _rope(d),
}
# (The NVFP4 ops are left out: they run on SM100 only, tests/gpu/test_nvfp4_kernels.py.)
