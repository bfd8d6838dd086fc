"""torch.ops.vllm_fusion RMSNorm(+residual)+FP8-quant kernels against the torch references."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

from vllm_fusion import ops as vf  # noqa: E402

OPS = torch.ops.vllm_fusion

DTYPES = [torch.bfloat16, torch.float16]
EPSILONS = [1e-5, 1e-6]
HIDDEN = [64, 2880, 4096, 5000, 8192]
TOKENS = [0, 1, 7, 256, 4096]
SCHEMES = {"static": None, "per_token": 0, "group64": 64, "group128": 128}


def _exact_values(gen, shape, dtype):
    """Nonzero multiples of 1/8 up to +-2: every square, and every sum of squares of a row
    (also of input + residual), is exact in fp32 whatever the summation order. The kernel and
    torch then compute the same variance, and agree bit for bit."""
    k = torch.randint(1, 17, shape, device="cuda", generator=gen)
    sign = torch.randint(0, 2, shape, device="cuda", generator=gen) * 2 - 1
    return (k * sign / 8).to(dtype)


def _inputs(gen, shape, dtype, residual=True, exact=True):
    if exact:
        x = _exact_values(gen, shape, dtype)
        r = _exact_values(gen, shape, dtype) if residual else None
    else:
        x = torch.randn(shape, dtype=dtype, device="cuda", generator=gen) * 2.0
        r = torch.randn(shape, dtype=dtype, device="cuda", generator=gen) if residual else None
    w = torch.randn(shape[-1], dtype=dtype, device="cuda", generator=gen)
    return x, r, w


def _static_scale(gen):
    # Small enough that the largest normalized values saturate.
    return 0.01 + 0.02 * torch.rand(1, device="cuda", generator=gen)


def _nbytes(shape, elem):
    n = elem
    for s in shape:
        n *= s
    return n


def _run_and_check(
    gen, shape, dtype, eps, scheme, residual, fp8_close, scales_close, poison,
    transposed=False, ue8m0=False, scale_ub=None, x=None, r=None, w=None, exact=True,
):
    """exact: inputs whose variance is order-independent (scales must match to 1e-6);
    otherwise a normalized value may round to the neighbouring value of the input dtype, and a
    scale may then be one input ulp off."""
    if x is None:
        x, r, w = _inputs(gen, shape, dtype, residual, exact)
    group = SCHEMES[scheme]
    fp8 = vf.fp8_dtype(x.device)
    what = (
        f"{scheme} residual={residual} shape={tuple(x.shape)} {dtype} eps={eps} "
        f"transposed={transposed} ue8m0={ue8m0} ub={scale_ub is not None} "
        f"seed={gen.initial_seed()}"
    )
    poison(_nbytes(x.shape, 1), _nbytes(x.shape, 2), _nbytes(x.shape, 4))
    if group is None:
        scale = _static_scale(gen)
        if residual:
            q, r_out = OPS.fused_add_rms_norm_static_fp8_quant(x, r, w, scale, eps)
            q_ref, r_ref = vf.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, scale, eps)
        else:
            q = OPS.rms_norm_static_fp8_quant(x, w, scale, eps)
            q_ref = vf.rms_norm_static_fp8_quant_ref(x, w, scale, eps)
        s, s_ref = scale, scale
    else:
        if residual:
            q, r_out, s = OPS.fused_add_rms_norm_dynamic_fp8_quant(
                x, r, w, eps, group, transposed, ue8m0, scale_ub
            )
            q_ref, r_ref, s_ref = vf.fused_add_rms_norm_dynamic_fp8_quant_ref(
                x, r, w, eps, group, transposed, ue8m0, scale_ub
            )
        else:
            q, s = OPS.rms_norm_dynamic_fp8_quant(x, w, eps, group, transposed, ue8m0, scale_ub)
            q_ref, s_ref = vf.rms_norm_dynamic_fp8_quant_ref(
                x, w, eps, group, transposed, ue8m0, scale_ub
            )
        scales_close(s, s_ref, input_dtype=None if exact else dtype, what=what)
    assert q.dtype == fp8 and q.shape == x.shape and q.is_contiguous(), what
    fp8_close(q, s, q_ref, s_ref, group or 0, what)
    if residual:
        assert r_out.dtype == dtype and r_out.shape == x.shape and r_out.is_contiguous(), what
        # The residual add is one fp32 add rounded to the input dtype: bit-exact.
        assert torch.equal(r_out.view(torch.int16), r_ref.view(torch.int16)), what


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_norm_quant(gen, fp8_close, scales_close, poison, dtype, eps, hidden, tokens, scheme,
                    residual):
    group = SCHEMES[scheme]
    if group and hidden % group:
        pytest.skip(f"hidden {hidden} not divisible by group {group}")
    _run_and_check(gen, (tokens, hidden), dtype, eps, scheme, residual, fp8_close, scales_close,
                   poison)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("tokens", [7, 4096])
@pytest.mark.parametrize("hidden", [2880, 4096, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_norm_quant_continuous(gen, fp8_close, scales_close, poison, dtype, hidden, tokens,
                               scheme, residual):
    """Normal-distributed inputs: values within one FP8 step, scales within one input ulp."""
    group = SCHEMES[scheme]
    if group and hidden % group:
        pytest.skip(f"hidden {hidden} not divisible by group {group}")
    _run_and_check(gen, (tokens, hidden), dtype, 1e-5, scheme, residual, fp8_close, scales_close,
                   poison, exact=False)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("ub", [False, True], ids=["", "ub"])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["", "ue8m0"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("scheme", ["per_token", "group64", "group128"])
@pytest.mark.parametrize("tokens", [7, 300])
@pytest.mark.parametrize("hidden", [2880, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_norm_quant_flags(gen, fp8_close, scales_close, poison, dtype, hidden, tokens, scheme,
                          transposed, ue8m0, ub, residual):
    group = SCHEMES[scheme]
    if group and hidden % group:
        pytest.skip(f"hidden {hidden} not divisible by group {group}")
    if ue8m0 and not group:
        pytest.skip("ue8m0 needs per-group scales")
    scale_ub = torch.tensor([1.5], device="cuda") if ub else None
    _run_and_check(gen, (tokens, hidden), dtype, 1e-6, scheme, residual, fp8_close, scales_close,
                   poison, transposed=transposed, ue8m0=ue8m0, scale_ub=scale_ub)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "colmajor"])
def test_norm_quant_3d(gen, fp8_close, scales_close, poison, scheme, transposed):
    if scheme == "static" and transposed:
        pytest.skip("static quant has no scale layout")
    _run_and_check(gen, (3, 5, 4096), torch.bfloat16, 1e-6, scheme, True, fp8_close,
                   scales_close, poison, transposed=transposed)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(
    "layout", ["row_stride", "misaligned", "odd_hidden", "wide"],
)
def test_norm_quant_layouts(gen, fp8_close, scales_close, poison, scheme, layout):
    """Strided rows (vector path), a misaligned base / odd hidden size / very wide rows
    (scalar fallback path)."""
    dtype = torch.bfloat16
    group = SCHEMES[scheme]
    if layout == "row_stride":
        x = _exact_values(gen, (37, 4096 + 64), dtype)[:, :4096]
    elif layout == "misaligned":
        x = _exact_values(gen, (37, 4096 + 8), dtype)[:, 1:4097]
    elif layout == "odd_hidden":
        if group:
            pytest.skip("group quant needs hidden divisible by the group")
        x = _exact_values(gen, (37, 1001), dtype)
    else:
        x = _exact_values(gen, (19, 20480), dtype)
    r = _exact_values(gen, x.shape, dtype)
    w = torch.randn(x.shape[-1], dtype=dtype, device="cuda", generator=gen)
    for residual in (False, True):
        _run_and_check(gen, x.shape, dtype, 1e-6, scheme, residual, fp8_close, scales_close,
                       poison, x=x, r=r if residual else None, w=w)


# ----------------------------------------------------------------------------- validation


def _args(dtype=torch.bfloat16, hidden=256, tokens=4):
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    return x, w, torch.tensor([0.1], device="cuda")


def test_rejects_wrong_input_dtype():
    x, w, s = _args(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="input must be bfloat16 or float16, got float32"):
        OPS.rms_norm_static_fp8_quant(x, w, s, 1e-6)


def test_rejects_weight_dtype_mismatch():
    x, w, s = _args()
    with pytest.raises(RuntimeError, match="weight must have the same dtype as input"):
        OPS.rms_norm_static_fp8_quant(x, w.half(), s, 1e-6)


def test_rejects_non_contiguous_last_dim():
    x, w, s = _args()
    xt = torch.randn(256, 4, dtype=torch.bfloat16, device="cuda").t()
    with pytest.raises(RuntimeError, match=r"input must be contiguous in its last dimension"):
        OPS.rms_norm_dynamic_fp8_quant(xt, w, 1e-6, 0, False, False, None)
    with pytest.raises(RuntimeError, match=r"residual must be contiguous in its last dimension"):
        OPS.fused_add_rms_norm_static_fp8_quant(x, xt, w, s, 1e-6)


def test_rejects_hidden_not_divisible_by_group():
    x, w, _ = _args(hidden=2880)
    with pytest.raises(RuntimeError, match="hidden size 2880 .* divisible by group_size 128"):
        OPS.rms_norm_dynamic_fp8_quant(x, w, 1e-6, 128, False, False, None)


def test_rejects_bad_group_size_and_flags():
    x, w, _ = _args()
    with pytest.raises(RuntimeError, match="group_size must be 0 .* 64 or 128, got 32"):
        OPS.rms_norm_dynamic_fp8_quant(x, w, 1e-6, 32, False, False, None)
    with pytest.raises(RuntimeError, match="scale_ue8m0=True requires group_size 64 or 128"):
        OPS.rms_norm_dynamic_fp8_quant(x, w, 1e-6, 0, False, True, None)


def test_rejects_bad_scale_and_residual():
    x, w, _ = _args()
    with pytest.raises(RuntimeError, match="scale must have exactly 1 element, got 2"):
        OPS.rms_norm_static_fp8_quant(x, w, torch.ones(2, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="scale must be a float32 tensor"):
        OPS.rms_norm_static_fp8_quant(x, w, torch.ones(1, device="cuda").half(), 1e-6)
    with pytest.raises(RuntimeError, match="residual must have the same shape as input"):
        OPS.fused_add_rms_norm_static_fp8_quant(x, x[:2], w, torch.ones(1, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be 1-D of size 256"):
        OPS.rms_norm_static_fp8_quant(x, w[:128], torch.ones(1, device="cuda"), 1e-6)
