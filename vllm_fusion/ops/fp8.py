"""FP8 helpers and the pure-torch references of the quantization step.

The references reproduce vLLM 0.26's unfused quantization exactly (rounding points included):

* static per-tensor (``QuantFP8.forward_native``): ``clamp(x * scale.reciprocal())``
* dynamic per-token (``QuantFP8.forward_native``): ``scale = clamp(min(absmax, ub) / fp8_max,
  min=1 / (fp8_max * 512))``, then ``clamp(x * scale.reciprocal())``
* dynamic per-group (``per_token_group_fp8_quant``, group 64 / 128): ``scale = max(min(absmax,
  ub), 1e-10) / fp8_max``, optionally rounded up to a power of two (UE8M0), then
  ``clamp(x / scale)``

and the clamp bound is the one vLLM uses: 448 for ``float8_e4m3fn``, 224 for
``float8_e4m3fnuz`` (gfx94x). Nothing here imports vLLM.
"""

from __future__ import annotations

import torch

# Floor of the per-group absmax (per_token_group_fp8_quant's ``eps``) and of its UE8M0 rounding.
GROUP_ABSMAX_EPS = 1e-10
GROUP_SIZES = (64, 128)


def fp8_dtype(device: torch.device | str | int | None = None) -> torch.dtype:
    """The FP8 dtype the kernels produce on ``device``: e4m3fnuz on ROCm gfx94x, else e4m3fn."""
    if torch.version.hip is None:
        return torch.float8_e4m3fn
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        arch = torch.cuda.get_device_properties(index).gcnArchName
    except (RuntimeError, AssertionError, AttributeError):
        return torch.float8_e4m3fn
    return torch.float8_e4m3fnuz if "gfx94" in arch else torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype) -> float:
    """Clamp bound of quantization to ``dtype``: vLLM uses 224 rather than 240 for fnuz."""
    if dtype == torch.float8_e4m3fnuz:
        return 224.0
    return float(torch.finfo(dtype).max)


def fp8_min_scale(dtype: torch.dtype) -> float:
    """Smallest per-token scale (vLLM's ``_FP8_MIN_SCALING_FACTOR``)."""
    return 1.0 / (fp8_max(dtype) * 512.0)


def check_dynamic_args(
    hidden: int, group_size: int, scale_transposed: bool, scale_ue8m0: bool, ndim: int
) -> None:
    """The argument checks the kernels make (same conditions, RuntimeError like theirs)."""
    if group_size not in (0, *GROUP_SIZES):
        raise RuntimeError(f"group_size must be 0 (per-token scales), 64 or 128, got {group_size}")
    if group_size and hidden % group_size:
        raise RuntimeError(
            f"hidden size {hidden} (last dim of the quantized output) must be divisible by "
            f"group_size {group_size}"
        )
    if scale_ue8m0 and not group_size:
        raise RuntimeError("scale_ue8m0=True requires group_size 64 or 128 (per-group scales)")
    if scale_transposed and ndim < 2:
        raise RuntimeError("scale_transposed=True requires an input of at least 2 dimensions")


def empty_scales(
    like: torch.Tensor, out_shape: tuple[int, ...], ngroups: int, transposed: bool
) -> torch.Tensor:
    """Scales as the kernels allocate them: ``[..., S, ngroups]`` float32, or with
    ``transposed`` the transpose of a contiguous ``[..., ngroups, S]`` (column-major storage,
    what per_token_group_fp8_quant allocates)."""
    lead = tuple(out_shape[:-1])
    if not transposed:
        return like.new_empty((*lead, ngroups), dtype=torch.float32)
    t = like.new_empty((*lead[:-1], ngroups, lead[-1]), dtype=torch.float32)
    return t.transpose(-1, -2)


def _as_column_major(scales: torch.Tensor) -> torch.Tensor:
    """The same values stored as the transpose of a contiguous [..., ngroups, S]."""
    shape = tuple(scales.shape)
    out = scales.new_empty((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    return out.copy_(scales)


# ----------------------------------------------------------------------------- references


def static_fp8_quant_ref(
    y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    dtype = dtype or fp8_dtype(y.device)
    m = fp8_max(dtype)
    return (y.to(torch.float32) * scale.to(torch.float32).reciprocal()).clamp(-m, m).to(dtype)


def per_token_fp8_quant_ref(
    y: torch.Tensor,
    scale_ub: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    scale_transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = dtype or fp8_dtype(y.device)
    m = fp8_max(dtype)
    x_max = y.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    if scale_ub is not None:
        x_max = x_max.clamp(max=scale_ub)
    scale = (x_max / m).clamp(min=fp8_min_scale(dtype))
    q = (y.to(torch.float32) * scale.reciprocal()).clamp(-m, m).to(dtype)
    if scale_transposed:
        scale = _as_column_major(scale)
    return q, scale


def per_group_fp8_quant_ref(
    y: torch.Tensor,
    group_size: int,
    scale_ue8m0: bool = False,
    scale_transposed: bool = False,
    scale_ub: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = dtype or fp8_dtype(y.device)
    m = fp8_max(dtype)
    yg = y.to(torch.float32).unflatten(-1, (-1, group_size))
    absmax = yg.abs().amax(dim=-1)
    if scale_ub is not None:
        absmax = absmax.clamp(max=scale_ub)
    scale = absmax.clamp(min=GROUP_ABSMAX_EPS) / m
    if scale_ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale.abs().clamp(min=GROUP_ABSMAX_EPS))))
    q = (yg / scale.unsqueeze(-1)).clamp(-m, m).to(dtype).flatten(-2)
    if scale_transposed:
        scale = _as_column_major(scale)
    return q, scale


def dynamic_fp8_quant_ref(
    y: torch.Tensor,
    group_size: int,
    scale_transposed: bool = False,
    scale_ue8m0: bool = False,
    scale_ub: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (group_size 0) or per-group (64 / 128) dynamic quantization."""
    check_dynamic_args(y.shape[-1], group_size, scale_transposed, scale_ue8m0, y.dim())
    if group_size == 0:
        return per_token_fp8_quant_ref(y, scale_ub, dtype, scale_transposed)
    return per_group_fp8_quant_ref(y, group_size, scale_ue8m0, scale_transposed, scale_ub, dtype)
