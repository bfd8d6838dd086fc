"""The input checks of the kernels (csrc/host_utils.h and the ops), in Python.

The fake impls run them, so a graph traced with bad inputs fails with the
kernel's own message, and the passes run them in ``extra_check``, so a site is
fused only where the kernel accepts its inputs. Each message names the op, the
argument and what was expected, word for word as the C++ check says it.
Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_fusion.ops.fp8 import fp8_dtype

# check_activation's limit on the last dimension: INT32_MAX / 2.
MAX_HIDDEN = (2**31 - 1) // 2
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"vllm_fusion::{op}: {message}")


def _known(value) -> bool:
    """Whether a size is a plain int (symbolic sizes are left to the kernel)."""
    return isinstance(value, int)


def check_activation(op: str, name: str, t: torch.Tensor) -> None:
    """input / residual: bfloat16 or float16, at least 1-D, contiguous last dimension."""
    if t.dtype not in ACTIVATION_DTYPES:
        _fail(op, f"{name} must be bfloat16 or float16, got {dtype_name(t.dtype)}")
    if t.dim() < 1:
        _fail(op, f"{name} must have at least 1 dimension")
    cols = t.shape[-1]
    if not _known(cols):
        return
    if cols <= 0:
        _fail(op, f"{name} must have a non-empty last dimension")
    if cols > MAX_HIDDEN:
        _fail(op, f"{name} last dimension too large ({cols})")
    if cols != 1 and _known(t.stride(-1)) and t.stride(-1) != 1:
        _fail(op, f"{name} must be contiguous in its last dimension (stride(-1) == 1), "
                  f"got stride {t.stride(-1)}")


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} must be on the same device as input ({ref.device}), got {t.device}")


def check_scale_scalar(op: str, name: str, t: torch.Tensor, input: torch.Tensor) -> None:
    check_same_device(op, name, t, input)
    if t.dtype != torch.float32:
        _fail(op, f"{name} must be a float32 tensor, got {dtype_name(t.dtype)}")
    if _known(t.numel()) and t.numel() != 1:
        _fail(op, f"{name} must have exactly 1 element, got {t.numel()}")


def check_norm_args(op: str, input: torch.Tensor, residual: torch.Tensor | None,
                    weight: torch.Tensor) -> None:
    """RMSNorm inputs (norm_quant in csrc/norm_quant_kernels.cu)."""
    check_activation(op, "input", input)
    hidden = input.shape[-1]
    if residual is not None:
        check_activation(op, "residual", residual)
        check_same_device(op, "residual", residual, input)
        if residual.dim() != input.dim() or any(
            _known(a) and _known(b) and a != b for a, b in zip(residual.shape, input.shape)
        ):
            _fail(op, "residual must have the same shape as input")
        if residual.dtype != input.dtype:
            _fail(op, f"residual must have the same dtype as input ({dtype_name(input.dtype)}), "
                      f"got {dtype_name(residual.dtype)}")
    check_same_device(op, "weight", weight, input)
    if weight.dim() != 1 or (_known(hidden) and weight.shape[0] != hidden):
        _fail(op, f"weight must be 1-D of size {hidden} (the last dim of input)")
    if weight.dtype != input.dtype:
        _fail(op, f"weight must have the same dtype as input ({dtype_name(input.dtype)}), "
                  f"got {dtype_name(weight.dtype)}")
    if weight.shape[0] != 1 and weight.stride(0) != 1:
        _fail(op, "weight must be contiguous")


def check_act_input(op: str, input: torch.Tensor) -> None:
    """SiLU*Mul input ``[..., 2d]`` (check_act_input in csrc/act_quant_kernels.cu)."""
    check_activation(op, "input", input)
    if _known(input.shape[-1]) and input.shape[-1] % 2:
        _fail(op, f"input last dim must be even ([gate | up] halves), got {input.shape[-1]}")


def check_padded_hidden(op: str, input: torch.Tensor, padded_hidden: int) -> None:
    """The padded width of the norm+pad kernels (norm_pad in csrc/norm_pad_kernels.cu)."""
    hidden = input.shape[-1]
    if _known(hidden) and padded_hidden < hidden:
        _fail(op, f"padded_hidden must be at least the hidden size {hidden} (the last dim of "
                  f"input), got {padded_hidden}")


def check_nvfp4_width(op: str, cols, what: str) -> None:
    """NVFP4 quantizes whole 16-element blocks (check_nvfp4_width in csrc/host_utils.h)."""
    if _known(cols) and cols % 16:
        _fail(op, f"NVFP4 quantizes blocks of 16 elements: {what} ({cols}) must be a "
                  "multiple of 16")


def accepts(check: Callable[..., None], *args) -> bool:
    """Whether ``check(*args)`` passes: what a pass asks before it fuses a site."""
    try:
        check(*args)
    except RuntimeError:
        return False
    return True


# ----------------------------------------------------------------------------- RoPE + KV cache

MAX_HEAD_SIZE = 512
COS_SIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.uint8)


def _differ(a, b) -> bool:
    return _known(a) and _known(b) and a != b


def _check_heads(op: str, name: str, t: torch.Tensor, query: torch.Tensor) -> None:
    check_activation(op, name, t)
    check_same_device(op, name, t, query)
    if t.dim() != 3:
        _fail(op, f"{name} must be 3-D [num_tokens, num_heads, head_size], got {t.dim()}-D")
    if t.dtype != query.dtype:
        _fail(op, f"{name} must have the same dtype as query ({dtype_name(query.dtype)}), "
                  f"got {dtype_name(t.dtype)}")
    if _differ(t.shape[0], query.shape[0]):
        _fail(op, f"{name} must have {query.shape[0]} tokens (query.size(0)), got {t.shape[0]}")


def _check_head_weight(op: str, name: str, w: torch.Tensor, query: torch.Tensor) -> None:
    check_same_device(op, name, w, query)
    if w.dim() != 1 or _differ(w.shape[0], query.shape[2]):
        _fail(op, f"{name} must be 1-D of size {query.shape[2]} (the head size)")
    if w.dtype != query.dtype:
        _fail(op, f"{name} must have the same dtype as query ({dtype_name(query.dtype)}), "
                  f"got {dtype_name(w.dtype)}")
    if w.shape[0] != 1 and w.stride(0) != 1:
        _fail(op, f"{name} must be contiguous")


def _check_cache(op: str, name: str, c: torch.Tensor, query: torch.Tensor, heads,
                 head_size) -> None:
    check_same_device(op, name, c, query)
    if c.dim() != 4:
        _fail(op, f"{name} must be 4-D [num_blocks, block_size, num_kv_heads, head_size], "
                  f"got {c.dim()}-D")
    if _differ(c.shape[2], heads) or _differ(c.shape[3], head_size):
        shape = ", ".join(str(s) for s in c.shape)
        _fail(op, f"{name} must have shape [num_blocks, block_size, {heads}, {head_size}], "
                  f"got [{shape}]")
    if c.shape[3] != 1 and _known(c.stride(3)) and c.stride(3) != 1:
        _fail(op, f"{name} must be contiguous in its last dimension (stride(-1) == 1), got "
                  f"stride {c.stride(3)}")
    if c.dtype != query.dtype and c.dtype not in FP8_CACHE_DTYPES:
        _fail(op, f"{name} must have the dtype of query ({dtype_name(query.dtype)}) or be fp8 "
                  f"(float8_e4m3fn, float8_e4m3fnuz or uint8), got {dtype_name(c.dtype)}")


def check_rope_kv_cache_args(
    op: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """qk_norm_rope_kv_cache's inputs (check_inputs in csrc/rope_kernels.cu)."""
    check_activation(op, "query", query)
    if query.dim() != 3:
        _fail(op, f"query must be 3-D [num_tokens, num_heads, head_size], got {query.dim()}-D")
    tokens, head_size = query.shape[0], query.shape[2]
    if _known(head_size) and head_size > MAX_HEAD_SIZE:
        _fail(op, f"head size (query.size(2)) must be at most {MAX_HEAD_SIZE}, got {head_size}")
    _check_heads(op, "key", key, query)
    if _differ(key.shape[2], head_size):
        _fail(op, f"key must have the head size of query ({head_size}), got {key.shape[2]}")
    kv_heads = key.shape[1]

    check_same_device(op, "positions", positions, query)
    if positions.dtype not in (torch.int64, torch.int32):
        _fail(op, f"positions must be int64 or int32, got {dtype_name(positions.dtype)}")
    if positions.dim() != 1 or _differ(positions.shape[0], tokens):
        _fail(op, f"positions must be 1-D with one entry per token ({tokens})")

    check_same_device(op, "cos_sin_cache", cos_sin_cache, query)
    if cos_sin_cache.dtype not in COS_SIN_DTYPES:
        _fail(op, "cos_sin_cache must be float32, bfloat16 or float16, got "
                  f"{dtype_name(cos_sin_cache.dtype)}")
    if cos_sin_cache.dim() != 2:
        _fail(op, "cos_sin_cache must be 2-D [max_position, rotary_dim]")
    rot = cos_sin_cache.shape[1]
    if _known(rot) and _known(head_size) and not (0 < rot <= head_size and rot % 2 == 0):
        _fail(op, f"rotary_dim (cos_sin_cache.size(1)) must be even and in [2, head size "
                  f"{head_size}], got {rot}")
    if not cos_sin_cache.is_contiguous():
        _fail(op, "cos_sin_cache must be contiguous")

    if (q_weight is None) != (k_weight is None):
        _fail(op, "q_weight and k_weight must be given together (both or neither)")
    if q_weight is not None:
        _check_head_weight(op, "q_weight", q_weight, query)
        _check_head_weight(op, "k_weight", k_weight, query)

    if (key_cache is None) != (value_cache is None):
        _fail(op, "key_cache and value_cache must be given together (both or neither)")
    if key_cache is None:
        return
    _check_heads(op, "value", value, query)
    if _differ(value.shape[1], kv_heads):
        _fail(op, f"value must have the {kv_heads} heads of key, got {value.shape[1]}")
    value_head_size = value.shape[2]
    if _known(value_head_size) and value_head_size > MAX_HEAD_SIZE:
        _fail(op, f"value head size must be at most {MAX_HEAD_SIZE}, got {value_head_size}")
    _check_cache(op, "key_cache", key_cache, query, kv_heads, head_size)
    _check_cache(op, "value_cache", value_cache, query, kv_heads, value_head_size)
    if value_cache.dtype != key_cache.dtype:
        _fail(op, f"value_cache must have the dtype of key_cache ({dtype_name(key_cache.dtype)}), "
                  f"got {dtype_name(value_cache.dtype)}")
    if _differ(value_cache.shape[0], key_cache.shape[0]) or _differ(value_cache.shape[1],
                                                                    key_cache.shape[1]):
        _fail(op, "value_cache must have the num_blocks and block_size of key_cache")
    if _known(key_cache.shape[1]) and key_cache.shape[1] <= 0:
        _fail(op, "block_size (key_cache.size(1)) must be positive")

    if slot_mapping is None:
        _fail(op, "slot_mapping must be given with the caches")
    check_same_device(op, "slot_mapping", slot_mapping, query)
    if slot_mapping.dtype != torch.int64:
        _fail(op, f"slot_mapping must be int64, got {dtype_name(slot_mapping.dtype)}")
    n = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
    if slot_mapping.dim() != 1 or (_known(n) and _known(tokens) and n > tokens):
        _fail(op, f"slot_mapping must be 1-D with at most {tokens} entries (one per token), "
                  f"got {n}")

    if key_cache.dtype in FP8_CACHE_DTYPES:
        if k_scale is None or v_scale is None:
            _fail(op, "an fp8 key_cache / value_cache needs k_scale and v_scale")
        check_scale_scalar(op, "k_scale", k_scale, query)
        check_scale_scalar(op, "v_scale", v_scale, query)
        platform = fp8_dtype(query.device)
        if key_cache.dtype not in (torch.uint8, platform):
            _fail(op, f"key_cache is {dtype_name(key_cache.dtype)} but this GPU's fp8 format is "
                      f"{dtype_name(platform)}")
