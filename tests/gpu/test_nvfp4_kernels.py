"""torch.ops.vllm_fusion NVFP4 kernels (SM100+) against vLLM 0.26's scaled_fp4_quant of the
unfused torch ops, and against the pure-torch reference. Skipped below SM100."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels(10, "NVFP4 kernels need an SM100+ GPU")

import torch  # noqa: E402

from vllm_fusion import ops as vf  # noqa: E402
from vllm_fusion.ops import nvfp4 as N  # noqa: E402

OPS = torch.ops.vllm_fusion
DTYPES = [torch.bfloat16, torch.float16]
TOKENS = [0, 1, 7, 129, 1024]
HIDDEN = [16, 144, 2880, 4096, 5008, 8192]  # 144 / 5008: scale blocks padded to 4


def vllm_fp4_quant(y: torch.Tensor, global_scale: torch.Tensor):
    """vLLM's own quant, as the unfused graph runs it: (q, block scales as int32)."""
    from vllm import _custom_ops as ops

    q, sf = ops.scaled_fp4_quant(y, global_scale, is_sf_swizzled_layout=True)
    return q, sf.view(torch.uint8).view(torch.int32)


def calibrated_global_scale(y: torch.Tensor) -> torch.Tensor:
    """What NVFP4 checkpoints store: 6 * 448 / absmax (of a calibration batch)."""
    amax = y.float().abs().amax().clamp(min=1e-4)
    return (N.E2M1_MAX * N.E4M3_MAX / amax).reshape(1).to(torch.float32)


def _codes(q):
    return N.unpack_e2m1(q)


def check_empty(q, s, n, what):
    """0 tokens: the shapes scaled_fp4_quant gives (vLLM's kernel is not launched for them)."""
    assert (tuple(q.shape), q.dtype) == ((0, n // 2), torch.uint8), what
    assert (tuple(s.shape), s.dtype) == ((0, (n // 16 + 3) // 4), torch.int32), what


def check_same_bytes(q, s, q_ref, s_ref, what):
    assert q.dtype == torch.uint8 and s.dtype == torch.int32, what
    assert q.shape == q_ref.shape and s.shape == s_ref.shape, (
        f"{what}: shapes {tuple(q.shape)}/{tuple(s.shape)} vs "
        f"{tuple(q_ref.shape)}/{tuple(s_ref.shape)}")
    sb, sb_ref = s.view(torch.uint8), s_ref.view(torch.uint8)
    bad = (sb != sb_ref).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} scale bytes differ, first at {bad[0].tolist()}"
    bad = (q != q_ref).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} packed bytes differ, first at {bad[0].tolist()}"


def check_close(q, s, q_ref, s_ref, n, what, max_scale_frac=0.0, max_code_frac=1e-3):
    """Block scales equal (up to ``max_scale_frac`` of them), and where a block's scales are
    equal its codes equal but for ``max_code_frac`` of them, each off by one e2m1 step."""
    assert q.shape == q_ref.shape and s.shape == s_ref.shape, what
    m = q.shape[0]
    if m == 0:
        return
    sf = N.unswizzle_block_scales(s, m, n).view(torch.uint8)
    sf_ref = N.unswizzle_block_scales(s_ref, m, n).view(torch.uint8)
    same_block = sf == sf_ref
    n_bad = int((~same_block).sum())
    assert n_bad <= max_scale_frac * sf.numel(), f"{what}: {n_bad}/{sf.numel()} block scales differ"
    # Padding slots are zero in both.
    padding = ~_payload_mask(m, n, s)
    assert not bool(s.view(torch.uint8)[padding].any()), f"{what}: nonzero scale padding"
    assert not bool(s_ref.view(torch.uint8)[padding].any()), f"{what}: reference padding"
    c, c_ref = _codes(q).unflatten(-1, (-1, 16)), _codes(q_ref).unflatten(-1, (-1, 16))
    v, v_ref = N.e2m1_decode(c), N.e2m1_decode(c_ref)
    differ = (v != v_ref) & same_block.unsqueeze(-1)
    frac = float(differ.sum()) / max(1, c.numel())
    assert frac <= max_code_frac, f"{what}: {int(differ.sum())}/{c.numel()} codes differ"
    grid = torch.tensor(N.E2M1_VALUES, device=q.device)
    idx = lambda x: (grid == x.abs().unsqueeze(-1)).float().argmax(-1)  # noqa: E731
    step = (idx(v) - idx(v_ref)).abs()[differ]
    assert step.numel() == 0 or int(step.max()) <= 1, f"{what}: a code differs by more than a step"


def _payload_mask(m, n, s):
    """Byte mask of the swizzled scale buffer: True where a real (row, block) scale lives."""
    marker = torch.ones(m, n // 16, dtype=torch.uint8, device=s.device)
    return N.swizzle_block_scales(marker.view(torch.float8_e4m3fn)).view(torch.uint8) != 0


def _activations(shape, dtype, gen, spread=3.0):
    x = torch.randn(shape, dtype=torch.float32, device="cuda", generator=gen) * spread
    return x.to(dtype)


# ----------------------------------------------------------------------------- SiLU*Mul


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_silu_mul_nvfp4_matches_vllm(gen, poison, dtype, d, tokens):
    x = _activations((tokens, 2 * d), dtype, gen)
    y = vf.silu_and_mul_ref(x)
    gs = calibrated_global_scale(y) if tokens else torch.ones(1, device="cuda")
    what = f"silu tokens={tokens} d={d} {dtype} seed={gen.initial_seed()}"
    poison(tokens * d // 2, 4 * ((tokens + 127) // 128 * 128) * ((d // 16 + 3) // 4))
    q, s = OPS.silu_and_mul_nvfp4_quant(x, gs)
    if tokens == 0:
        return check_empty(q, s, d, what)
    # SiLU*Mul is elementwise and rounded as torch rounds it: the bytes are vLLM's.
    check_same_bytes(q, s, *vllm_fp4_quant(y, gs), what)
    check_close(q, s, *vf.silu_and_mul_nvfp4_quant_ref(x, gs), d, what + " (reference)")


def test_silu_mul_nvfp4_3d_and_strided_input(gen):
    base = _activations((3, 5, 2 * 256 + 64), torch.bfloat16, gen)
    x = base[..., : 2 * 256]  # rows 576 elements apart
    gs = calibrated_global_scale(x)
    q, s = OPS.silu_and_mul_nvfp4_quant(x, gs)
    assert tuple(q.shape) == (15, 128)
    check_same_bytes(q, s, *vllm_fp4_quant(vf.silu_and_mul_ref(x).reshape(15, 256), gs), "3d")
    x = base.reshape(-1)[1 : 1 + 15 * 512].reshape(15, 512)  # unaligned: the scalar kernel
    q, s = OPS.silu_and_mul_nvfp4_quant(x, gs)
    check_same_bytes(q, s, *vllm_fp4_quant(vf.silu_and_mul_ref(x), gs), "unaligned")


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused_add"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_rms_norm_nvfp4_matches_vllm(gen, poison, dtype, hidden, tokens, residual):
    x = _activations((tokens, hidden), dtype, gen)
    r = _activations((tokens, hidden), dtype, gen) if residual else None
    w = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).to(dtype)
    eps = 1e-6
    if residual:
        y, r_ref = vf.fused_add_rms_norm_ref(x, r, w, eps)
    else:
        y = vf.rms_norm_ref(x, w, eps)
    gs = calibrated_global_scale(y) if tokens else torch.ones(1, device="cuda")
    what = f"norm residual={residual} tokens={tokens} H={hidden} {dtype} seed={gen.initial_seed()}"
    poison(tokens * hidden // 2, 4 * ((tokens + 127) // 128 * 128) * ((hidden // 16 + 3) // 4))
    if residual:
        q, r_out, s = OPS.fused_add_rms_norm_nvfp4_quant(x, r, w, gs, eps)
        assert torch.equal(r_out, r_ref), what
    else:
        q, s = OPS.rms_norm_nvfp4_quant(x, w, gs, eps)
    if tokens == 0:
        return check_empty(q, s, hidden, what)
    # The kernel's fp32 sum of squares runs in another order than torch's: a normalized value
    # can round to the neighbouring input-dtype value, moving a block scale or a code.
    for q_ref, s_ref, tag in (
        (*vllm_fp4_quant(y, gs), "vLLM"),
        (*vf.nvfp4_quant_ref(y, gs), "reference"),
    ):
        check_close(q, s, q_ref, s_ref, hidden, f"{what} vs {tag}", max_scale_frac=0.01,
                    max_code_frac=0.01)


def test_rms_norm_nvfp4_wide_rows_take_the_scalar_kernel(gen):
    x = _activations((3, 32768), torch.bfloat16, gen)
    w = torch.ones(32768, dtype=torch.bfloat16, device="cuda")
    y = vf.rms_norm_ref(x, w, 1e-5)
    gs = calibrated_global_scale(y)
    q, s = OPS.rms_norm_nvfp4_quant(x, w, gs, 1e-5)
    check_close(q, s, *vllm_fp4_quant(y, gs), 32768, "wide", max_scale_frac=0.01,
                max_code_frac=0.01)


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_are_rejected_with_clear_messages():
    gs = torch.ones(1, device="cuda")
    x = torch.randn(4, 40, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"hidden size .*\(40\) must be a multiple of 16"):
        OPS.rms_norm_nvfp4_quant(x, torch.ones(40, device="cuda", dtype=torch.bfloat16), gs, 1e-6)
    with pytest.raises(RuntimeError, match=r"output width .*\(20\) must be a multiple of 16"):
        OPS.silu_and_mul_nvfp4_quant(x, gs)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="global_scale must be a float32 tensor"):
        OPS.silu_and_mul_nvfp4_quant(x, gs.half())
