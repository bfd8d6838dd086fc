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
