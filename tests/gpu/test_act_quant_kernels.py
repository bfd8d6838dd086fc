"""torch.ops.vllm_fusion SiLU*Mul+FP8-quant kernels against the torch references."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

from vllm_fusion import ops as vf  # noqa: E402

OPS = torch.ops.vllm_fusion

DTYPES = [torch.bfloat16, torch.float16]
D = [64, 2880, 4096, 5000, 8192]  # output width; the input is [..., 2 * d]
TOKENS = [0, 1, 7, 256, 4096]
SCHEMES = {"static": None, "per_token": 0, "group64": 64, "group128": 128}


def _run_and_check(gen, x, scheme, fp8_close, scales_close, poison, transposed=False,
                   ue8m0=False, scale_ub=None):
    group = SCHEMES[scheme]
    d = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], d)
    what = (
        f"{scheme} shape={tuple(x.shape)} {x.dtype} transposed={transposed} ue8m0={ue8m0} "
        f"ub={scale_ub is not None} seed={gen.initial_seed()}"
    )
    n = x.numel() // 2
    poison(n, 4 * n)
    if group is None:
        scale = 0.005 + 0.01 * torch.rand(1, device="cuda", generator=gen)
        q = OPS.silu_and_mul_static_fp8_quant(x, scale)
        q_ref = vf.silu_and_mul_static_fp8_quant_ref(x, scale)
        s, s_ref = scale, scale
    else:
        q, s = OPS.silu_and_mul_dynamic_fp8_quant(x, group, transposed, ue8m0, scale_ub)
        q_ref, s_ref = vf.silu_and_mul_dynamic_fp8_quant_ref(
            x, group, transposed, ue8m0, scale_ub
        )
        # SiLU*Mul is elementwise and computed exactly as torch does: scales match to 1e-6.
        scales_close(s, s_ref, what=what)
    assert q.dtype == vf.fp8_dtype(x.device), what
    assert tuple(q.shape) == out_shape and q.is_contiguous(), what
    fp8_close(q, s, q_ref, s_ref, group or 0, what)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("d", D)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_silu_mul_quant(gen, fp8_close, scales_close, poison, dtype, d, tokens, scheme):
    group = SCHEMES[scheme]
    if group and d % group:
        pytest.skip(f"d {d} not divisible by group {group}")
    x = torch.randn(tokens, 2 * d, dtype=dtype, device="cuda", generator=gen) * 2.0
    _run_and_check(gen, x, scheme, fp8_close, scales_close, poison)


@pytest.mark.parametrize("ub", [False, True], ids=["", "ub"])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["", "ue8m0"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("scheme", ["per_token", "group64", "group128"])
@pytest.mark.parametrize("tokens", [7, 300])
@pytest.mark.parametrize("d", [2880, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_silu_mul_quant_flags(gen, fp8_close, scales_close, poison, dtype, d, tokens, scheme,
                              transposed, ue8m0, ub):
    group = SCHEMES[scheme]
    if group and d % group:
        pytest.skip(f"d {d} not divisible by group {group}")
    if ue8m0 and not group:
        pytest.skip("ue8m0 needs per-group scales")
    x = torch.randn(tokens, 2 * d, dtype=dtype, device="cuda", generator=gen) * 2.0
    scale_ub = torch.tensor([1.5], device="cuda") if ub else None
    _run_and_check(gen, x, scheme, fp8_close, scales_close, poison, transposed, ue8m0, scale_ub)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("layout", ["3d", "row_stride", "misaligned", "odd_d", "wide"])
def test_silu_mul_quant_layouts(gen, fp8_close, scales_close, poison, scheme, layout):
    dtype = torch.bfloat16
    group = SCHEMES[scheme]
    if layout == "3d":
        x = torch.randn(3, 5, 2 * 4096, dtype=dtype, device="cuda", generator=gen)
    elif layout == "row_stride":
        x = torch.randn(37, 2 * 4096 + 64, dtype=dtype, device="cuda", generator=gen)[:, :8192]
    elif layout == "misaligned":
        x = torch.randn(37, 2 * 4096 + 8, dtype=dtype, device="cuda", generator=gen)[:, 1:8193]
    elif layout == "odd_d":
        if group:
            pytest.skip("group quant needs d divisible by the group")
        x = torch.randn(37, 2 * 1001, dtype=dtype, device="cuda", generator=gen)
    else:
        x = torch.randn(5, 2 * 28672, dtype=dtype, device="cuda", generator=gen)
    _run_and_check(gen, x, scheme, fp8_close, scales_close, poison,
                   transposed=layout == "3d" and group is not None)


# ----------------------------------------------------------------------------- validation


def test_rejects_wrong_dtype():
    x = torch.randn(4, 256, device="cuda")
    with pytest.raises(RuntimeError, match="input must be bfloat16 or float16, got float32"):
        OPS.silu_and_mul_static_fp8_quant(x, torch.ones(1, device="cuda"))


def test_rejects_odd_last_dim():
    x = torch.randn(4, 255, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="input last dim must be even"):
        OPS.silu_and_mul_dynamic_fp8_quant(x, 0, False, False, None)


def test_rejects_non_contiguous_last_dim():
    x = torch.randn(256, 4, dtype=torch.bfloat16, device="cuda").t()
    with pytest.raises(RuntimeError, match="input must be contiguous in its last dimension"):
        OPS.silu_and_mul_static_fp8_quant(x, torch.ones(1, device="cuda"))


def test_rejects_d_not_divisible_by_group():
    x = torch.randn(4, 2 * 2880, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="hidden size 2880 .* divisible by group_size 128"):
        OPS.silu_and_mul_dynamic_fp8_quant(x, 128, False, False, None)
    with pytest.raises(RuntimeError, match="scale_ue8m0=True requires group_size 64 or 128"):
        OPS.silu_and_mul_dynamic_fp8_quant(x, 0, False, True, None)
