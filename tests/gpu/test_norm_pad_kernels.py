"""torch.ops.vllm_fusion RMSNorm(+residual) + hidden-padding kernels against the torch
references: the padded output equals add + RMSNorm + F.pad, and the pad columns are really
written as zeros (the output memory is poisoned with NaN before every call)."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

from vllm_fusion import ops as vf  # noqa: E402

OPS = torch.ops.vllm_fusion

DTYPES = [torch.bfloat16, torch.float16]
HIDDEN = [64, 2880, 4096, 5000]
MULTIPLES = [128, 256]
TOKENS = [0, 1, 7, 256, 4096]


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _exact_values(gen, shape, dtype):
    """Nonzero multiples of 1/8 up to +-2: every sum of squares of a row (also of input +
    residual) is exact in fp32 whatever the summation order, so kernel and torch agree bit
    for bit."""
    k = torch.randint(1, 17, shape, device="cuda", generator=gen)
    sign = torch.randint(0, 2, shape, device="cuda", generator=gen) * 2 - 1
    return (k * sign / 8).to(dtype)


def _inputs(gen, shape, dtype, exact):
    if exact:
        x, r = _exact_values(gen, shape, dtype), _exact_values(gen, shape, dtype)
    else:
        x = torch.randn(shape, dtype=dtype, device="cuda", generator=gen) * 2.0
        r = torch.randn(shape, dtype=dtype, device="cuda", generator=gen)
    w = torch.randn(shape[-1], dtype=dtype, device="cuda", generator=gen)
    return x, r, w


def _nbytes(shape, elem=2):
    n = elem
    for s in shape:
        n *= s
    return n


def _check_close(out, ref, dtype, exact, what):
    """Bit-exact for exact inputs. Otherwise the kernel's fp32 sum of squares is accumulated in
    another order than torch's, so a normalized value may round to the neighbouring value of
    the dtype before the weight multiply: allow two ulps of the dtype."""
    if exact:
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
        return
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps,
                               msg=lambda m: f"{what}: {m}")


def _run_and_check(gen, poison, shape, padded, dtype, eps, residual, exact=True, x=None):
    if x is None:
        x, r, w = _inputs(gen, shape, dtype, exact)
    else:
        _, r, w = _inputs(gen, tuple(x.shape), dtype, exact)
    hidden = x.shape[-1]
    out_shape = (*x.shape[:-1], padded)
    what = (f"residual={residual} shape={tuple(x.shape)} padded={padded} {dtype} eps={eps} "
            f"exact={exact} seed={gen.initial_seed()}")
    # The op allocates residual_out, then out: the blocks it reuses hold 0xFF (NaN) bytes.
    if residual:
        poison(_nbytes(x.shape), _nbytes(out_shape))
        out, r_out = OPS.fused_add_rms_norm_pad(x, r, w, eps, padded)
        ref, r_ref = vf.fused_add_rms_norm_pad_ref(x, r, w, eps, padded)
        assert r_out.shape == x.shape and r_out.is_contiguous(), what
        torch.testing.assert_close(r_out, r_ref, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
    else:
        poison(_nbytes(out_shape))
        out = OPS.rms_norm_pad(x, w, eps, padded)
        ref = vf.rms_norm_pad_ref(x, w, eps, padded)
    assert out.shape == out_shape and out.dtype == dtype and out.is_contiguous(), what
    assert not torch.isnan(out).any(), f"{what}: NaN left in the output"
    pad = out[..., hidden:]
    assert torch.equal(pad, torch.zeros_like(pad)), f"{what}: pad columns not zero"
    _check_close(out, ref, dtype, exact, what)


@pytest.mark.parametrize("residual", [True, False], ids=["fused_add", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("multiple", MULTIPLES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_padded_norm_matches_reference(gen, poison, hidden, multiple, tokens, dtype, residual):
    padded = round_up(hidden, multiple)
    for eps in (1e-5, 1e-6):
        _run_and_check(gen, poison, (tokens, hidden), padded, dtype, eps, residual)


@pytest.mark.parametrize("residual", [True, False], ids=["fused_add", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 256, 4096])
@pytest.mark.parametrize("hidden, padded", [(2880, 3072), (2880, 2944), (5000, 5120)])
def test_random_inputs_within_two_ulps(gen, poison, hidden, padded, tokens, dtype, residual):
    _run_and_check(gen, poison, (tokens, hidden), padded, dtype, 1e-5, residual, exact=False)


@pytest.mark.parametrize("residual", [True, False], ids=["fused_add", "plain"])
@pytest.mark.parametrize("hidden, padded", [
    (2883, 3072),   # odd hidden size: scalar kernel
    (2880, 2900),   # padded rows not 16-byte aligned: scalar kernel
    (2880, 2880),   # nothing to pad
    (20000, 20480),  # row too wide for registers: scalar kernel
    (8, 16),
])
def test_tails_and_fallback_paths(gen, poison, hidden, padded, residual):
    for tokens in (1, 7, 300):
        _run_and_check(gen, poison, (tokens, hidden), padded, torch.bfloat16, 1e-6, residual)


@pytest.mark.parametrize("residual", [True, False], ids=["fused_add", "plain"])
def test_strided_and_3d_inputs(gen, poison, residual):
    base = _exact_values(gen, (33, 3008), torch.float16)
    _run_and_check(gen, poison, None, 3072, torch.float16, 1e-5, residual, x=base[:, :2880])
    x3 = _exact_values(gen, (2, 5, 2880), torch.bfloat16)
    _run_and_check(gen, poison, None, 3072, torch.bfloat16, 1e-5, residual, x=x3)


def test_errors_say_what_was_expected():
    x = torch.randn(4, 2880, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2880, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="padded_hidden must be at least the hidden size 2880"):
        OPS.fused_add_rms_norm_pad(x, x, w, 1e-6, 2816)
    with pytest.raises(RuntimeError, match="weight must be 1-D of size 2880"):
        OPS.rms_norm_pad(x, w[:64], 1e-6, 3072)
    with pytest.raises(RuntimeError, match="residual must have the same dtype as input"):
        OPS.fused_add_rms_norm_pad(x, x.half(), w, 1e-6, 3072)
    with pytest.raises(RuntimeError, match="input must be bfloat16 or float16, got float32"):
        OPS.rms_norm_pad(x.float(), w, 1e-6, 3072)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        OPS.rms_norm_pad(x.cpu(), w, 1e-6, 3072)
