"""torch.ops.vllm_fusion.qk_norm_rope_kv_cache against its torch reference (the spec, in
vllm_fusion/ops/rope.py) on fresh random inputs, and against vLLM's own unfused kernels
(rotary_embedding + reshape_and_cache_flash) when vLLM's _C is loadable.

q_out, k_out and the written cache slots must equal the reference bit for bit (fp8 caches:
within one fp8 step), cache slots that are not written must keep their NaN poison, and the
outputs must be fully written (their memory is NaN-poisoned before the call)."""

from __future__ import annotations

import itertools

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

from vllm_fusion.ops import fp8_dtype  # noqa: E402
from vllm_fusion.ops.rope import qk_norm_rope_kv_cache_ref  # noqa: E402

OP = torch.ops.vllm_fusion.qk_norm_rope_kv_cache
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MAX_POS = 8192
EPS = 1e-6

HEAD_SIZES = [64, 80, 96, 128, 256]
HEADS = [(32, 8), (8, 8), (16, 2), (5, 1)]
TOKENS = [0, 1, 7, 256, 1000]
BLOCK_SIZES = [16, 32, 64]


# ----------------------------------------------------------------------------- inputs


def cos_sin_cache(rot: int, dtype=FP32, base: float = 10000.0) -> torch.Tensor:
    """vLLM's RotaryEmbedding cache: [MAX_POS, rot], cos | sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=FP32, device="cuda") / rot))
    freqs = torch.outer(torch.arange(MAX_POS, dtype=FP32, device="cuda"), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def exact_values(gen, shape, dtype):
    """Nonzero multiples of 1/8 up to +-2: every sum of squares of a head is exact in fp32
    whatever the summation order, so the kernel's RMSNorm equals torch's bit for bit."""
    k = torch.randint(1, 17, shape, device="cuda", generator=gen)
    sign = torch.randint(0, 2, shape, device="cuda", generator=gen) * 2 - 1
    return (k * sign / 8).to(dtype)


def qkv_views(gen, tokens, hq, hkv, d, dtype, exact, layout="qkv"):
    """q, k, v as vLLM passes them: views of one [T, (Hq + 2 Hkv) * D] tensor ("qkv"),
    separate contiguous tensors ("separate"), or views of a row with an odd token stride that
    no vector access can take ("unaligned")."""
    width = (hq + 2 * hkv) * d
    extra = 1 if layout == "unaligned" else 0
    shape = (tokens, width + extra)
    if exact:
        qkv = exact_values(gen, shape, dtype)
    else:
        qkv = (torch.randn(shape, device="cuda", generator=gen) * 2).to(dtype)
    qkv = qkv[:, extra:] if extra else qkv
    q, k, v = (t.unflatten(-1, (h, d)) for t, h in
               zip(qkv.split([hq * d, hkv * d, hkv * d], dim=-1), (hq, hkv, hkv)))
    if layout == "separate":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def poison_fill(t: torch.Tensor) -> torch.Tensor:
    """NaN in every element (fp8 / uint8: the e4m3 NaN byte 0x7f)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.uint8):
        t.view(torch.uint8).fill_(0x7F)
    else:
        t.fill_(float("nan"))
    return t


def kv_caches(num_blocks, bs, h, d, dtype, layout):
    """The (key_cache, value_cache) views vLLM 0.26's backends hand to reshape_and_cache_flash,
    NaN-poisoned.

    nhd: FLASH_ATTN / TRITON_ATTN (NHD): kv_cache allocated [nb, bs, H, 2D], seen through the
         logical shape [nb, H, bs, 2D]; key / value = kv_cache.transpose(1, 2).split(D, -1).
    hnd: FLASHINFER (HND): allocated [nb, H, bs, 2D]; the same transpose + split gives views
         whose head stride is bs * 2D.
    split: the older [2, nb, bs, H, D] cache, unbind(0).
    """
    if layout == "split":
        kv = poison_fill(torch.empty(2, num_blocks, bs, h, d, dtype=dtype, device="cuda"))
        return kv.unbind(0)
    if layout == "nhd":
        kv = poison_fill(torch.empty(num_blocks, bs, h, 2 * d, dtype=dtype, device="cuda"))
        logical = kv.transpose(1, 2)  # [nb, H, bs, 2D]
    else:
        logical = poison_fill(torch.empty(num_blocks, h, bs, 2 * d, dtype=dtype, device="cuda"))
    return logical.transpose(1, 2).split(d, dim=-1)


def slot_mapping(gen, n, num_blocks, bs, pad=0):
    """n distinct random slots, the last `pad` of them -1 (padding tokens)."""
    slots = torch.randperm(num_blocks * bs, device="cuda", generator=gen)[:n]
    if pad:
        slots[n - pad:] = -1
    return slots


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.uint8)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape, what
    if not torch.equal(bits(a), bits(b)):
        diff = (bits(a) != bits(b)).nonzero()
        raise AssertionError(f"{what}: {diff.shape[0]} elements differ, first at "
                             f"{diff[0].tolist()}: {a[tuple(diff[0])]} vs {b[tuple(diff[0])]}")


def poison_allocator(*shapes_dtypes):
    """Leave NaN in the blocks the caching allocator hands out next for these sizes, so that
    an output element the kernel never writes shows up as NaN."""
    junk = [torch.full(s, float("nan"), dtype=dt, device="cuda") for s, dt in shapes_dtypes]
    del junk


def fp8_step_close(got: torch.Tensor, want: torch.Tensor, what: str):
    """Within one e4m3 step (3 mantissa bits) after dequantization."""
    g, w = got.float(), want.float()
    assert not g.isnan().any(), what
    step = torch.maximum(w.abs(), g.abs()) * 2.0 ** -3 + 2.0 ** -9
    bad = (g - w).abs() > step
    assert not bad.any(), f"{what}: {bad.sum().item()} values more than one fp8 step apart"


# ----------------------------------------------------------------------------- runner


def run_both(q, k, v, pos, cache, neox, qw, kw, caches_fn=None, slots=None, scales=(None, None)):
    """The kernel and the reference on the same inputs, each with its own freshly poisoned
    caches; returns ((q_out, k_out, kc, vc) kernel, (... ) reference)."""
    results = []
    for impl in ("kernel", "ref"):
        kc, vc = caches_fn() if caches_fn else (None, None)
        if impl == "kernel":
            poison_allocator((q.shape, q.dtype), (k.shape, k.dtype))
            q_out, k_out = OP(q, k, v, pos, cache, neox, qw, kw, EPS, kc, vc, slots, *scales)
        else:
            q_out, k_out = qk_norm_rope_kv_cache_ref(q, k, v, pos, cache, neox, qw, kw, EPS, kc,
                                                     vc, slots, *scales)
        results.append((q_out, k_out, kc, vc))
    torch.cuda.synchronize()
    return results


def check_exact(kernel, ref, cache_exact=True):
    (q1, k1, kc1, vc1), (q2, k2, kc2, vc2) = kernel, ref
    assert q1.is_contiguous() and k1.is_contiguous()
    assert_bits_equal(q1, q2, "q_out")
    assert_bits_equal(k1, k2, "k_out")
    assert not q1.isnan().any() and not k1.isnan().any(), "outputs not fully written"
    if kc1 is not None:
        if cache_exact:
            assert_bits_equal(kc1, kc2, "key_cache")  # NaN slots compare equal bitwise
            assert_bits_equal(vc1, vc2, "value_cache")


# ----------------------------------------------------------------------------- tests


def _case_params():
    for d, heads, tokens, neox in itertools.product(HEAD_SIZES, HEADS, TOKENS, [True, False]):
        yield pytest.param(d, heads, tokens, neox, id=f"D{d}-H{heads[0]}x{heads[1]}-T{tokens}-"
                           f"{'neox' if neox else 'gptj'}")


@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("d,heads,tokens,neox", list(_case_params()))
def test_matches_reference(d, heads, tokens, neox, norm):
    """bf16 / fp16 with a cache of the same dtype; block size, dtype and cache layout vary
    with the case."""
    hq, hkv = heads
    seed = hash((d, heads, tokens, neox, norm)) % 2**31
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dtype = [BF16, FP16][seed % 2]
    bs = BLOCK_SIZES[seed % 3]
    layout = ["nhd", "hnd", "split"][(seed // 3) % 3]
    q, k, v = qkv_views(gen, tokens, hq, hkv, d, dtype, exact=norm)
    pos = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=gen)
    cache = cos_sin_cache(d)
    qw = kw = None
    if norm:
        qw = torch.randn(d, device="cuda", generator=gen).to(dtype)
        kw = torch.randn(d, device="cuda", generator=gen).to(dtype)
    num_blocks = max(1, (tokens + bs - 1) // bs) + 2
    slots = slot_mapping(gen, tokens, num_blocks, bs)
    kernel, ref = run_both(q, k, v, pos, cache, neox, qw, kw,
                           lambda: kv_caches(num_blocks, bs, hkv, d, dtype, layout), slots)
    check_exact(kernel, ref)
    written = (~kernel[2].isnan().all(-1)).sum().item()  # (slot, head) rows written
    assert written == tokens * hkv


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("d,rot", [(128, 64), (128, 32), (128, 96), (256, 64), (80, 40),
                                   (64, 2)])
def test_partial_rotary(d, rot, neox, dtype):
    gen = torch.Generator(device="cuda").manual_seed(d * 1000 + rot)
    q, k, v = qkv_views(gen, 77, 8, 2, d, dtype, exact=False)
    pos = torch.randint(0, MAX_POS, (77,), device="cuda", generator=gen)
    kernel, ref = run_both(q, k, v, pos, cos_sin_cache(rot), neox, None, None,
                           lambda: kv_caches(8, 16, 2, d, dtype, "nhd"),
                           slot_mapping(gen, 77, 8, 16))
    check_exact(kernel, ref)
    assert torch.equal(kernel[0][..., rot:], q[..., rot:])  # pass-through dims


@pytest.mark.parametrize("layout", ["qkv", "separate", "unaligned"])
@pytest.mark.parametrize("d", [64, 128, 130, 192, 320, 512])
def test_head_sizes_and_views(d, layout):
    """Vector kernel (aligned views; D = 192: NeoX partners through shared memory) and the
    generic kernel (D = 130, or an odd token stride)."""
    gen = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = qkv_views(gen, 33, 6, 2, d, BF16, exact=True, layout=layout)
    qw = exact_values(gen, (d,), BF16)
    kw = exact_values(gen, (d,), BF16)
    pos = torch.randint(0, MAX_POS, (33,), device="cuda", generator=gen)
    for neox in (True, False):
        kernel, ref = run_both(q, k, v, pos, cos_sin_cache(d), neox, qw, kw,
                               lambda: kv_caches(5, 16, 2, d, BF16, "hnd"),
                               slot_mapping(gen, 33, 5, 16))
        check_exact(kernel, ref)


@pytest.mark.parametrize("cs_dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_cos_sin_and_position_dtypes(cs_dtype, pos_dtype):
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = qkv_views(gen, 50, 16, 2, 128, BF16, exact=False)
    # A strided view of a longer positions buffer, as vLLM may pass it.
    buf = torch.randint(0, MAX_POS, (150,), device="cuda", generator=gen).to(pos_dtype)
    pos = buf[::3]
    kernel, ref = run_both(q, k, v, pos, cos_sin_cache(128, cs_dtype), True, None, None)
    check_exact(kernel, ref)


@pytest.mark.parametrize("layout", ["nhd", "hnd", "split"])
@pytest.mark.parametrize("tokens,n,pad", [(7, 7, 2), (64, 40, 5), (1000, 999, 100), (3, 0, 0)])
def test_slot_mapping_padding(tokens, n, pad, layout):
    """Tokens t >= N and slots -1 are not written: those cache entries keep their NaN."""
    gen = torch.Generator(device="cuda").manual_seed(tokens + n)
    bs, nb = 16, (tokens + 15) // 16 + 1
    q, k, v = qkv_views(gen, tokens, 32, 8, 128, BF16, exact=False)
    pos = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=gen)
    slots = slot_mapping(gen, n, nb, bs, pad)
    kernel, ref = run_both(q, k, v, pos, cos_sin_cache(128), True, None, None,
                           lambda: kv_caches(nb, bs, 8, 128, BF16, layout), slots)
    check_exact(kernel, ref)
    kc, vc = kernel[2], kernel[3]
    written = ~kc.isnan().all(-1)  # [nb, bs, H]
    assert written.sum().item() == (n - pad) * 8
    assert (~vc.isnan().all(-1)).sum().item() == (n - pad) * 8
    # Nothing partially written.
    assert torch.equal(kc.isnan().any(-1), kc.isnan().all(-1))


@pytest.mark.parametrize("cache_dtype", ["fp8", "uint8"])
@pytest.mark.parametrize("d", [64, 96, 128, 130])
@pytest.mark.parametrize("norm", [False, True])
def test_fp8_cache(cache_dtype, d, norm):
    gen = torch.Generator(device="cuda").manual_seed(d + 7 * norm)
    fp8 = fp8_dtype()
    cdt = fp8 if cache_dtype == "fp8" else torch.uint8
    tokens = 300
    q, k, v = qkv_views(gen, tokens, 8, 2, d, BF16, exact=norm)
    k.mul_(30)  # some values saturate
    qw = kw = None
    if norm:
        qw, kw = exact_values(gen, (d,), BF16), exact_values(gen, (d,), BF16)
    pos = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=gen)
    scales = (torch.tensor([0.07], device="cuda"), torch.tensor([0.011], device="cuda"))
    slots = slot_mapping(gen, tokens, 20, 16, pad=9)
    kernel, ref = run_both(q, k, v, pos, cos_sin_cache(d), True, qw, kw,
                           lambda: kv_caches(20, 16, 2, d, cdt, "nhd"), slots, scales)
    check_exact(kernel, ref, cache_exact=False)
    for i, what in ((2, "key_cache"), (3, "value_cache")):
        got, want = kernel[i].view(fp8).float(), ref[i].view(fp8).float()
        untouched = got.isnan()
        assert torch.equal(untouched, want.isnan()), f"{what}: written slots"
        assert untouched.all(-1).sum().item() == (20 * 16 - (tokens - 9)) * 2
        fp8_step_close(got[~untouched], want[~untouched], what)


def test_zero_tokens_launches_nothing():
    q = torch.empty(0, 4, 128, dtype=BF16, device="cuda")
    kc, vc = kv_caches(2, 16, 4, 128, BF16, "nhd")
    before = bits(kc).clone()
    q_out, k_out = OP(q, q, q, torch.empty(0, dtype=torch.int64, device="cuda"),
                      cos_sin_cache(128), True, None, None, EPS, kc, vc,
                      torch.empty(0, dtype=torch.int64, device="cuda"), None, None)
    assert q_out.shape == (0, 4, 128) and k_out.shape == (0, 4, 128)
    assert torch.equal(bits(kc), before)


def test_cuda_graph_capture():
    """No host synchronization: the op captures into a CUDA graph and replays correctly."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = qkv_views(gen, 16, 32, 8, 128, BF16, exact=False)
    pos = torch.randint(0, MAX_POS, (16,), device="cuda", generator=gen)
    cache = cos_sin_cache(128)
    kc, vc = kv_caches(4, 16, 8, 128, BF16, "nhd")
    slots = slot_mapping(gen, 16, 4, 16)
    OP(q, k, v, pos, cache, True, None, None, EPS, kc, vc, slots, None, None)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = OP(q, k, v, pos, cache, True, None, None, EPS, kc, vc, slots, None, None)
    pos.copy_(torch.randint(0, MAX_POS, (16,), device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    want_q, want_k = qk_norm_rope_kv_cache_ref(q, k, v, pos, cache, True, None, None, EPS)
    assert_bits_equal(q_out, want_q, "q_out")
    assert_bits_equal(k_out, want_k, "k_out")


# ----------------------------------------------------------------------------- vs vLLM


def _vllm_ops():
    try:
        import vllm._custom_ops  # noqa: F401, PLC0415

        torch.ops._C.rotary_embedding  # noqa: B018
        torch.ops._C_cache_ops.reshape_and_cache_flash  # noqa: B018
    except (ImportError, AttributeError, RuntimeError, OSError) as e:
        pytest.skip(f"vLLM's _C kernels are not loadable: {e}")


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("d,rot", [(128, 128), (64, 64), (256, 256), (128, 64)])
def test_matches_vllm_unfused_kernels(d, rot, tokens, neox, dtype):
    """vLLM's rotary_embedding (in place on q / k) then reshape_and_cache_flash. vLLM computes
    RoPE in the input dtype: every product and the sum are rounded to bf16 / fp16, where we
    round once from fp32; the results may differ by about one ulp of the dtype of the inputs'
    magnitude (more than one ulp of a result that cancels), hence the tolerance. v goes to the
    cache unchanged: equal bit for bit."""
    _vllm_ops()
    hq, hkv, bs, nb = 8, 2, 16, (tokens + 15) // 16 + 1
    gen = torch.Generator(device="cuda").manual_seed(tokens + d)
    q, k, v = qkv_views(gen, tokens, hq, hkv, d, dtype, exact=False)
    pos = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=gen)
    cache = cos_sin_cache(rot, dtype)  # vLLM's kernel wants the cache in the query dtype
    slots = slot_mapping(gen, tokens, nb, bs)
    kc, vc = kv_caches(nb, bs, hkv, d, dtype, "nhd")
    q_out, k_out = OP(q, k, v, pos, cache, neox, None, None, EPS, kc, vc, slots, None, None)

    vq, vk = q.reshape(tokens, -1).clone(), k.reshape(tokens, -1).clone()
    torch.ops._C.rotary_embedding(pos, vq, vk, d, cache, neox)
    vkc, vvc = kv_caches(nb, bs, hkv, d, dtype, "nhd")
    one = torch.ones(1, device="cuda")
    torch.ops._C_cache_ops.reshape_and_cache_flash(vk.view(tokens, hkv, d), v, vkc, vvc, slots,
                                                   "auto", one, one)
    torch.cuda.synchronize()
    ulp = torch.finfo(dtype).eps
    mag = 2 * max(q.abs().max().item(), k.abs().max().item(), 1.0)
    torch.testing.assert_close(q_out.float(), vq.view_as(q_out).float(), rtol=ulp, atol=ulp * mag)
    torch.testing.assert_close(k_out.float(), vk.view_as(k_out).float(), rtol=ulp, atol=ulp * mag)
    written = ~kc.isnan().all(-1)
    assert torch.equal(written, ~vkc.isnan().all(-1))
    torch.testing.assert_close(kc[written].float(), vkc[written].float(), rtol=ulp,
                               atol=ulp * mag)
    assert_bits_equal(vc[written], vvc[written], "value_cache")
