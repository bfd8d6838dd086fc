"""Shared checks for the kernel tests in tests/gpu (they need a CUDA GPU and vllm_fusion._C).

The test modules skip themselves at import when either is missing; this file only provides
fixtures, so it is safe to collect anywhere.
"""

from __future__ import annotations

import pytest
import torch


def fp8_step(mag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One e4m3 step (ulp) at magnitude ``mag`` (in FP8 units): 3 mantissa bits, subnormals
    below 2^-6 (e4m3fn) or 2^-7 (e4m3fnuz)."""
    min_exp = -6 if dtype == torch.float8_e4m3fn else -7
    e = torch.floor(torch.log2(mag.clamp(min=2.0**min_exp)))
    return torch.exp2(e - 3)


def _expand_scales(q: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    s = s.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(()).expand(q.shape)
    if group_size:
        return s.repeat_interleave(group_size, dim=-1)
    return s.expand(q.shape)


def check_fp8_close(
    q: torch.Tensor,
    s: torch.Tensor,
    q_ref: torch.Tensor,
    s_ref: torch.Tensor,
    group_size: int = 0,
    what: str = "",
) -> None:
    """Dequantized values agree within one FP8 step at their magnitude, times the scale."""
    assert q.dtype == q_ref.dtype, f"{what}: dtype {q.dtype} != {q_ref.dtype}"
    assert q.shape == q_ref.shape, f"{what}: shape {tuple(q.shape)} != {tuple(q_ref.shape)}"
    if q.numel() == 0:
        return
    qa, qb = q.to(torch.float64), q_ref.to(torch.float64)
    assert not torch.isnan(qa).any(), f"{what}: NaN in the quantized output"
    sa = _expand_scales(q, s, group_size).to(torch.float64)
    sb = _expand_scales(q_ref, s_ref, group_size).to(torch.float64)
    a, b = qa * sa, qb * sb
    mag = torch.maximum(qa.abs(), qb.abs())
    tol = fp8_step(mag, q.dtype) * torch.maximum(sa, sb) * (1 + 1e-6)
    bad = (a - b).abs() > tol
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        n = int(bad.sum())
        raise AssertionError(
            f"{what}: {n}/{q.numel()} values differ by more than one FP8 step; first at {idx}: "
            f"q={qa[tuple(idx)].item()} (scale {sa[tuple(idx)].item()}) vs "
            f"ref q={qb[tuple(idx)].item()} (scale {sb[tuple(idx)].item()})"
        )


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides in every dimension where the stride matters (size > 1)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def check_scales_close(
    s: torch.Tensor,
    s_ref: torch.Tensor,
    input_dtype: torch.dtype | None = None,
    what: str = "",
) -> None:
    """Scales agree within 1e-6 relative. With ``input_dtype`` (RMSNorm: the kernel's fp32
    sum of squares is accumulated in another order than torch's, so a normalized value can
    round to the neighbouring ``input_dtype`` value, and the product with the weight is rounded
    once more), a scale may instead differ by up to two ulps of that dtype, at most for a tenth
    of them."""
    assert s.dtype == torch.float32, f"{what}: scales dtype {s.dtype}"
    assert s.shape == s_ref.shape, f"{what}: scales shape {tuple(s.shape)} != {tuple(s_ref.shape)}"
    assert same_layout(s, s_ref), f"{what}: scales strides {s.stride()} != {s_ref.stride()}"
    if s.numel() == 0:
        return
    assert not torch.isnan(s).any(), f"{what}: NaN in the scales"
    rel = (s - s_ref).abs() / s_ref.abs()
    exact = rel <= 1e-6
    if bool(exact.all()):
        return
    n_off = int((~exact).sum())
    worst = float(rel.max())
    if input_dtype is None:
        raise AssertionError(f"{what}: {n_off}/{s.numel()} scales off by > 1e-6 (max {worst})")
    ulp = torch.finfo(input_dtype).eps  # largest relative spacing of the input dtype
    assert worst <= 2 * ulp * 1.01, f"{what}: scale off by {worst} relative (> two input ulps)"
    assert n_off <= max(2, s.numel() // 10), (
        f"{what}: {n_off}/{s.numel()} scales off by an input ulp (too many)"
    )


def poison_allocations(*nbytes: int) -> None:
    """Fill and free blocks of these sizes, so that the op's next allocations (same sizes,
    same order) reuse memory holding 0xFF bytes: NaN as e4m3fn, bf16/fp16 and float32. An
    element the kernel fails to write then shows up as NaN."""
    blocks = [
        torch.full((max(int(n), 1),), 255, dtype=torch.uint8, device="cuda") for n in nbytes
    ]
    del blocks


@pytest.fixture
def fp8_close():
    return check_fp8_close


@pytest.fixture
def scales_close():
    return check_scales_close


@pytest.fixture
def poison():
    return poison_allocations


@pytest.fixture
def gen():
    """A CUDA generator with a fresh random seed per test (``g.initial_seed()`` to replay)."""
    g = torch.Generator(device="cuda")
    g.seed()
    return g
