"""Randomized tests of every torch.ops.vllm_fusion kernel (hypothesis): shapes (0 and 1
token, odd and unaligned hidden sizes, 3-D inputs, padded rows), dtypes and quant
arguments drawn at random, each output compared with the torch reference. The memory
the op allocates its outputs from is filled with 0xFF first (NaN in every output dtype),
so an element the kernel does not write shows up as NaN or a mismatch.

Bounded: about 200 examples in all, well under two minutes on an H100. A failure prints
the drawn arguments and the torch seed; hypothesis replays it on the next run.
"""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vllm_fusion import ops as vf  # noqa: E402

OPS = torch.ops.vllm_fusion
EXAMPLES = 50
# The fixtures used here are stateless helpers: sharing them between examples is fine.
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

DTYPES = st.sampled_from([torch.bfloat16, torch.float16])
# Leading dims: 0 and 1 token often, up to a few hundred rows, sometimes [batch, seq].
LEADING = st.one_of(
    st.sampled_from([(0,), (1,)]),
    st.integers(2, 300).map(lambda n: (n,)),
    st.tuples(st.integers(1, 3), st.integers(0, 40)),
)
# Extra elements at the end of each row: 0 (contiguous), a whole vector (strided but
# aligned), or 3 (rows not 16-byte aligned: the kernels' scalar path).
ROW_PAD = st.sampled_from([0, 0, 8, 3])


def widths(group: int, max_width: int) -> st.SearchStrategy[int]:
    """Widths the kernel accepts for ``group``: any for per-tensor/per-token, odd ones too."""
    if group:
        return st.integers(1, max_width // group).map(lambda k: k * group)
    return st.one_of(st.sampled_from([1, 7, 8, 2880, 5000]), st.integers(1, max_width))


@st.composite
def quant_args(draw):
    """(group, scale_transposed, scale_ue8m0, use_scale_ub) of a dynamic-quant call."""
    group = draw(st.sampled_from([0, 64, 128]))
    transposed = draw(st.booleans())
    ue8m0 = bool(group) and draw(st.booleans())
    use_ub = group == 0 and draw(st.booleans())
    return group, transposed, ue8m0, use_ub


def _tensor(gen, leading, width, pad, dtype, exact):
    """Random values of shape leading + (width,), rows ``pad`` elements apart beyond width.

    exact: multiples of 1/8 up to +-2, whose sums of squares are exact in fp32 (the kernel
    and torch then agree bit for bit on the variance); else normal values."""
    shape = (*leading, width + pad)
    if exact:
        k = torch.randint(1, 17, shape, device="cuda", generator=gen)
        sign = torch.randint(0, 2, shape, device="cuda", generator=gen) * 2 - 1
        full = (k * sign / 8).to(dtype)
    else:
        full = (torch.randn(shape, device="cuda", generator=gen) * 2).to(dtype)
    return full[..., :width]


def _poison_outputs(poison, leading, width, n_scales):
    rows = 1
    for n in leading:
        rows *= n
    poison(rows * width, rows * width * 2, rows * n_scales * 4)


def _seeded(seed):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    return gen


@SETTINGS
@given(dtype=DTYPES, leading=LEADING, pad=ROW_PAD, residual=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6]), exact=st.booleans(), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_rms_norm_static_fp8_quant(poison, fp8_close, dtype, leading, pad, residual, eps, exact,
                                   seed, data):
    width = data.draw(widths(0, 8192), label="hidden")
    gen = _seeded(seed)
    x = _tensor(gen, leading, width, pad, dtype, exact)
    r = _tensor(gen, leading, width, 0, dtype, exact) if residual else None
    w = torch.randn(width, device="cuda", generator=gen).to(dtype)
    scale = 0.01 + 0.02 * torch.rand(1, device="cuda", generator=gen)
    _poison_outputs(poison, leading, width, 0)
    if residual:
        q, r_out = OPS.fused_add_rms_norm_static_fp8_quant(x, r, w, scale, eps)
        q_ref, r_ref = vf.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, scale, eps)
        assert torch.equal(r_out.view(torch.int16), r_ref.view(torch.int16))
    else:
        q = OPS.rms_norm_static_fp8_quant(x, w, scale, eps)
        q_ref = vf.rms_norm_static_fp8_quant_ref(x, w, scale, eps)
    assert q.shape == x.shape and q.is_contiguous()
    fp8_close(q, scale, q_ref, scale, 0, f"shape={tuple(x.shape)} pad={pad} seed={seed}")


@SETTINGS
@given(dtype=DTYPES, leading=LEADING, pad=ROW_PAD, residual=st.booleans(), quant=quant_args(),
       exact=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_rms_norm_dynamic_fp8_quant(poison, fp8_close, scales_close, dtype, leading, pad,
                                    residual, quant, exact, seed, data):
    group, transposed, ue8m0, use_ub = quant
    width = data.draw(widths(group, 8192), label="hidden")
    gen = _seeded(seed)
    x = _tensor(gen, leading, width, pad, dtype, exact)
    r = _tensor(gen, leading, width, 0, dtype, exact) if residual else None
    w = torch.randn(width, device="cuda", generator=gen).to(dtype)
    ub = (0.5 + torch.rand(1, device="cuda", generator=gen)) if use_ub else None
    eps = 1e-6
    _poison_outputs(poison, leading, width, width // group if group else 1)
    what = (f"shape={tuple(x.shape)} pad={pad} group={group} transposed={transposed} "
            f"ue8m0={ue8m0} ub={use_ub} seed={seed}")
    if residual:
        q, r_out, s = OPS.fused_add_rms_norm_dynamic_fp8_quant(
            x, r, w, eps, group, transposed, ue8m0, ub)
        q_ref, r_ref, s_ref = vf.fused_add_rms_norm_dynamic_fp8_quant_ref(
            x, r, w, eps, group, transposed, ue8m0, ub)
        assert torch.equal(r_out.view(torch.int16), r_ref.view(torch.int16)), what
    else:
        q, s = OPS.rms_norm_dynamic_fp8_quant(x, w, eps, group, transposed, ue8m0, ub)
        q_ref, s_ref = vf.rms_norm_dynamic_fp8_quant_ref(x, w, eps, group, transposed, ue8m0, ub)
    assert q.shape == x.shape and q.is_contiguous(), what
    scales_close(s, s_ref, input_dtype=None if exact else dtype, what=what)
    fp8_close(q, s, q_ref, s_ref, group, what)


@SETTINGS
@given(dtype=DTYPES, leading=LEADING, pad=ROW_PAD, seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_silu_and_mul_static_fp8_quant(poison, fp8_close, dtype, leading, pad, seed, data):
    d = data.draw(widths(0, 8192), label="d")
    gen = _seeded(seed)
    x = _tensor(gen, leading, 2 * d, pad, dtype, exact=False)
    scale = 0.005 + 0.01 * torch.rand(1, device="cuda", generator=gen)
    _poison_outputs(poison, leading, d, 0)
    q = OPS.silu_and_mul_static_fp8_quant(x, scale)
    q_ref = vf.silu_and_mul_static_fp8_quant_ref(x, scale)
    assert q.shape == (*leading, d) and q.is_contiguous()
    fp8_close(q, scale, q_ref, scale, 0, f"shape={tuple(x.shape)} pad={pad} seed={seed}")


@SETTINGS
@given(dtype=DTYPES, leading=LEADING, pad=ROW_PAD, quant=quant_args(),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_silu_and_mul_dynamic_fp8_quant(poison, fp8_close, scales_close, dtype, leading, pad,
                                        quant, seed, data):
    group, transposed, ue8m0, use_ub = quant
    d = data.draw(widths(group, 8192), label="d")
    gen = _seeded(seed)
    x = _tensor(gen, leading, 2 * d, pad, dtype, exact=False)
    ub = (0.5 + torch.rand(1, device="cuda", generator=gen)) if use_ub else None
    _poison_outputs(poison, leading, d, d // group if group else 1)
    what = (f"shape={tuple(x.shape)} pad={pad} group={group} transposed={transposed} "
            f"ue8m0={ue8m0} ub={use_ub} seed={seed}")
    q, s = OPS.silu_and_mul_dynamic_fp8_quant(x, group, transposed, ue8m0, ub)
    q_ref, s_ref = vf.silu_and_mul_dynamic_fp8_quant_ref(x, group, transposed, ue8m0, ub)
    assert q.shape == (*leading, d) and q.is_contiguous(), what
    # SiLU*Mul is elementwise and rounded as torch rounds it: scales match to 1e-6.
    scales_close(s, s_ref, what=what)
    fp8_close(q, s, q_ref, s_ref, group, what)


# (QK-norm +) RoPE + KV-cache write: head sizes on and off the 16-byte token-major path,
# partial rotary, both styles, optional norm and cache, padded slot mappings. Inputs are views
# of one qkv tensor (optionally with extra row elements), as in vLLM's graphs.
HEAD_SIZES = st.sampled_from([64, 64, 128, 128, 256, 80, 96, 130, 192])
HEADS = st.sampled_from([(1, 1), (4, 4), (8, 2), (32, 8), (5, 1)])


@st.composite
def rotary_dims(draw, head_size):
    """The full head, or an even part of it (partial rotary)."""
    if draw(st.booleans()):
        return head_size
    return 2 * draw(st.integers(1, head_size // 2))


@SETTINGS
@given(dtype=DTYPES, heads=HEADS, head_size=HEAD_SIZES, neox=st.booleans(), norm=st.booleans(),
       cache=st.sampled_from(["none", "same", "fp8"]), tokens=st.sampled_from([0, 1, 7, 64, 300]),
       row_pad=st.sampled_from([0, 8, 3]), block_size=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_qk_norm_rope_kv_cache(poison, dtype, heads, head_size, neox, norm, cache, tokens,
                               row_pad, block_size, seed, data):
    hq, hkv = heads
    rot = data.draw(rotary_dims(head_size), label="rotary_dim")
    gen = _seeded(seed)
    width = (hq + 2 * hkv) * head_size
    qkv = (torch.randn(tokens, width + row_pad, device="cuda", generator=gen)
           .to(dtype)[:, :width])
    q, k, v = qkv.split([hq * head_size, hkv * head_size, hkv * head_size], -1)
    q, k, v = (q.view(tokens, hq, head_size), k.view(tokens, hkv, head_size),
               v.view(tokens, hkv, head_size))
    positions = torch.randint(0, 512, (tokens,), device="cuda", generator=gen)
    cos_sin = torch.randn(512, rot, device="cuda", generator=gen).to(dtype)
    weights = ((torch.rand(head_size, device="cuda", generator=gen) + 0.5).to(dtype),
               (torch.rand(head_size, device="cuda", generator=gen) + 0.5).to(dtype)
               ) if norm else (None, None)
    caches = (None,) * 5
    ours = theirs = None
    if cache != "none":
        blocks = max(tokens // block_size + 2, 2)
        cache_dtype = dtype if cache == "same" else vf.fp8_dtype()
        shape = (blocks, block_size, hkv, head_size)
        # NaN everywhere: a slot the op must not write stays NaN; a written one is compared.
        ours = (torch.full(shape, float("nan"), device="cuda").to(cache_dtype),
                torch.full(shape, float("nan"), device="cuda").to(cache_dtype))
        theirs = (ours[0].clone(), ours[1].clone())
        n = data.draw(st.integers(0, tokens), label="slots")
        slots = torch.randperm(blocks * block_size, device="cuda", generator=gen)[:n]
        if n > 1:
            slots[n // 2] = -1  # a padded token
        scales = ((torch.rand(1, device="cuda", generator=gen) + 0.5,
                   torch.rand(1, device="cuda", generator=gen) + 0.5)
                  if cache == "fp8" else (None, None))
        caches = (*ours, slots, *scales)
        ref_caches = (*theirs, slots, *scales)
    _poison_outputs(poison, (tokens,), (hq + hkv) * head_size, 0)
    q_out, k_out = OPS.qk_norm_rope_kv_cache(q, k, v, positions, cos_sin, neox, *weights, 1e-6,
                                             *caches)
    q_ref, k_ref = vf.rope.qk_norm_rope_kv_cache_ref(
        q, k, v, positions, cos_sin, neox, *weights, 1e-6,
        *(ref_caches if cache != "none" else caches))
    what = (f"heads={heads} D={head_size} rot={rot} neox={neox} norm={norm} cache={cache} "
            f"T={tokens} pad={row_pad} seed={seed}")
    # RoPE is exact (fp32, no FMA); the per-head norm's fp32 sum may round differently.
    tol = dict(rtol=1e-2, atol=1e-2) if norm else dict(rtol=0, atol=0)
    torch.testing.assert_close(q_out, q_ref, **tol, msg=what)
    torch.testing.assert_close(k_out, k_ref, **tol, msg=what)
    if cache == "same":
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=what)
    elif cache == "fp8":
        for a, b in zip(ours, theirs):
            # One e4m3 step where the norm rounds differently; NaN where nothing was written.
            torch.testing.assert_close(a.float(), b.float(), equal_nan=True, rtol=0.13,
                                       atol=2.0**-6, msg=what)


@SETTINGS
@given(dtype=DTYPES, leading=LEADING, pad=ROW_PAD, residual=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6]), exact=st.booleans(), extra=st.integers(0, 300),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_rms_norm_pad(poison, dtype, leading, pad, residual, eps, exact, extra, seed, data):
    width = data.draw(widths(0, 6000), label="hidden")
    padded = width + extra
    gen = _seeded(seed)
    x = _tensor(gen, leading, width, pad, dtype, exact)
    r = _tensor(gen, leading, width, 0, dtype, exact) if residual else None
    w = torch.randn(width, device="cuda", generator=gen).to(dtype)
    rows = 1
    for n in leading:
        rows *= n
    what = f"shape={tuple(x.shape)} padded={padded} pad={pad} exact={exact} seed={seed}"
    # The op allocates (residual_out, then) out: blocks of those sizes hold 0xFF (NaN) first.
    if residual:
        poison(rows * width * 2, rows * padded * 2)
        out, r_out = OPS.fused_add_rms_norm_pad(x, r, w, eps, padded)
        ref, r_ref = vf.fused_add_rms_norm_pad_ref(x, r, w, eps, padded)
        assert torch.equal(r_out.view(torch.int16), r_ref.view(torch.int16)), what
    else:
        poison(rows * padded * 2)
        out = OPS.rms_norm_pad(x, w, eps, padded)
        ref = vf.rms_norm_pad_ref(x, w, eps, padded)
    assert out.shape == (*leading, padded) and out.is_contiguous(), what
    assert torch.equal(out[..., width:], torch.zeros_like(out[..., width:])), what
    # Exact inputs: bit for bit; random ones: the fp32 sum may round differently (2 ulps).
    tol = 0 if exact else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=what)
