"""The pure-torch NVFP4 reference (vllm_fusion.ops.nvfp4), on CPU: e2m1 rounding, packing,
block scales, the swizzled scale layout, round trips, and agreement with vLLM 0.26's own
CPU-runnable NVFP4 helpers."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_fusion.ops import nvfp4 as N
from vllm_fusion.ops.act_quant import silu_and_mul_nvfp4_quant_ref, silu_and_mul_ref
from vllm_fusion.ops.norm_quant import (
    fused_add_rms_norm_nvfp4_quant_ref,
    fused_add_rms_norm_ref,
    rms_norm_nvfp4_quant_ref,
)

GRID = torch.tensor(N.E2M1_VALUES)
SHAPES = [(1, 16), (5, 64), (127, 48), (130, 144), (300, 256)]


def _gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


def _random(m, n, dtype, g, spread=4.0):
    # Rows of very different magnitudes, so block scales span much of the e4m3 range.
    mag = torch.exp2(torch.randint(-4, 4, (m, 1), generator=g).float())
    return (torch.randn(m, n, generator=g) * spread * mag).to(dtype)


def _nearest_even(v: torch.Tensor) -> torch.Tensor:
    """Independent e2m1 rounding: the nearest grid value, ties to the even code, clamped."""
    a = v.abs().clamp(max=6.0)
    dist = (a.unsqueeze(-1) - GRID).abs()
    best = dist.min(dim=-1, keepdim=True).values
    ties = dist == best
    # Among the nearest codes prefer an even one (only two can tie).
    even = ties & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    return code.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)


def test_e2m1_rounding_table():
    cases = {
        0.0: 0.0, 0.1: 0.0, 0.25: 0.0, 0.2501: 0.5, 0.5: 0.5, 0.7499: 0.5, 0.75: 1.0,
        1.25: 1.0, 1.2501: 1.5, 1.75: 2.0, 2.5: 2.0, 2.5001: 3.0, 3.5: 4.0, 4.9: 4.0, 5.0: 4.0,
        5.0001: 6.0, 6.0: 6.0, 7.0: 6.0, 1e30: 6.0, float("inf"): 6.0,
        -0.3: -0.5, -1.75: -2.0, -5.0: -4.0, -100.0: -6.0,
    }
    v = torch.tensor(list(cases), dtype=torch.float32)
    got = N.e2m1_decode(N.e2m1_codes(v))
    assert got.tolist() == list(cases.values())
    # Signed zeros keep their sign bit, as cvt.rn.satfinite does.
    assert N.e2m1_codes(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [8, 8, 0]


def test_e2m1_rounding_matches_nearest_even_everywhere():
    g = _gen()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    v = torch.cat([ties, -ties, torch.randn(20000, generator=g) * 3, torch.linspace(-7, 7, 2801)])
    assert torch.equal(N.e2m1_codes(v), _nearest_even(v))


def test_pack_order_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = N.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F, 0x87]]  # element 2i in the low nibble
    assert torch.equal(N.unpack_e2m1(packed), codes)
    g = _gen()
    codes = torch.randint(0, 16, (9, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(N.unpack_e2m1(N.pack_e2m1(codes)), codes)


def _swizzle_by_index(sf: torch.Tensor) -> torch.Tensor:
    """The layout written out element by element: (row, block) -> byte offset."""
    m, blocks = sf.shape
    k_tiles = (blocks + 3) // 4
    pm = (m + 127) // 128 * 128
    out = torch.zeros(pm * k_tiles * 4, dtype=torch.uint8)
    flat = sf.view(torch.uint8)
    for r, b in itertools.product(range(m), range(blocks)):
        offset = (((r // 128) * k_tiles + b // 4) * 512 + (r % 32) * 16
                  + ((r // 32) % 4) * 4 + b % 4)
        out[offset] = flat[r, b]
    return out


@pytest.mark.parametrize("m", [1, 31, 128, 129, 300])
@pytest.mark.parametrize("blocks", [1, 3, 4, 5, 17])
def test_swizzle_against_index_formula(m, blocks):
    g = _gen()
    sf = torch.randint(1, 255, (m, blocks), generator=g, dtype=torch.uint8)
    sf = sf.view(torch.float8_e4m3fn)
    swizzled = N.swizzle_block_scales(sf)
    assert swizzled.dtype == torch.int32
    assert tuple(swizzled.shape) == N.scale_shape(m, blocks * 16)
    assert torch.equal(swizzled.view(torch.uint8).flatten(), _swizzle_by_index(sf))
    back = N.unswizzle_block_scales(swizzled, m, blocks * 16)
    assert torch.equal(back.view(torch.uint8), sf.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n", SHAPES)
def test_round_trip_error_within_half_a_step(m, n, dtype):
    g = _gen()
    y = _random(m, n, dtype, g)
    # The global scale vLLM calibrates: the tensor's absmax maps to 6 * 448.
    gs = (N.E2M1_MAX * N.E4M3_MAX / y.float().abs().amax()).reshape(1)
    q, scales = N.nvfp4_quant_ref(y, gs)
    assert (q.dtype, tuple(q.shape)) == (torch.uint8, (m, n // 2))
    assert (scales.dtype, tuple(scales.shape)) == (torch.int32, N.scale_shape(m, n))
    deq = N.nvfp4_dequant_ref(q, scales, gs, n)
    # Per block: |error| <= half the widest e2m1 gap (1.0, between 4 and 6) in block-scale
    # units; the block scale is absmax / 6 up to e4m3 rounding (< 1/16 relative, or half the
    # subnormal step 2^-9 below 2^-6, which can also saturate values by up to 6 * 2^-10).
    yb = y.float().unflatten(-1, (-1, 16))
    step = yb.abs().amax(-1, keepdim=True) / 6 * (1 + 1 / 16) + 4 * 2.0**-9 / gs
    err = (deq.unflatten(-1, (-1, 16)) - yb).abs()
    assert bool((err <= step * (1 + 1e-6)).all()), float((err / step).max())
    # Re-quantizing what was dequantized gives the same codes and scales.
    q2, scales2 = N.nvfp4_quant_ref(deq, gs)
    assert torch.equal(q2, q) and torch.equal(scales2, scales)


def test_zero_blocks_scale_zero_and_padding_zero():
    y = torch.zeros(3, 48, dtype=torch.bfloat16)
    y[1, 16:32] = torch.linspace(-3, 3, 16)
    q, scales = N.nvfp4_quant_ref(y, torch.tensor([1.0]))
    sf = N.unswizzle_block_scales(scales, 3, 48).float()
    assert sf[0].tolist() == [0.0, 0.0, 0.0] and sf[1, 0] == 0 and sf[1, 1] == 0.5
    assert int(q[0].count_nonzero()) == 0 and int(q[1, :8].count_nonzero()) == 0
    # Padding rows 3..127 and padding block 3: zero.
    raw = scales.view(torch.uint8).flatten()
    assert int(raw.count_nonzero()) == 1


def test_block_scale_saturates_at_448():
    y = torch.full((1, 16), 6.0, dtype=torch.bfloat16)
    q, scales = N.nvfp4_quant_ref(y, torch.tensor([1000.0]))
    assert N.unswizzle_block_scales(scales, 1, 16).float().item() == 448.0
    assert N.e2m1_decode(N.unpack_e2m1(q)).unique().tolist() == [6.0]


def test_leading_dims_are_flattened_like_scaled_fp4_quant():
    g = _gen()
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    gs = torch.tensor([50.0])
    q, scales = N.nvfp4_quant_ref(x, gs)
    q2, scales2 = N.nvfp4_quant_ref(x.reshape(6, 64), gs)
    assert tuple(q.shape) == (6, 32) and torch.equal(q, q2) and torch.equal(scales, scales2)
    q, scales = silu_and_mul_nvfp4_quant_ref(torch.randn(2, 3, 128, generator=g), gs)
    assert tuple(q.shape) == (6, 32) and tuple(scales.shape) == (128, 1)


def test_fused_references_compose_norm_and_quant():
    g = _gen()
    x, res = (torch.randn(5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.rand(64, generator=g).to(torch.bfloat16) + 0.5
    gs = torch.tensor([100.0])
    q, res_out, scales = fused_add_rms_norm_nvfp4_quant_ref(x, res, w, gs, 1e-6)
    y, expected_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(res_out, expected_res)
    assert all(torch.equal(a, b) for a, b in zip((q, scales), N.nvfp4_quant_ref(y, gs)))
    q1, s1 = rms_norm_nvfp4_quant_ref(x, w, gs, 1e-6)
    assert not torch.equal(q1, q)  # the residual changes the input
    x2 = torch.randn(4, 96, generator=g).to(torch.float16)
    q2, s2 = silu_and_mul_nvfp4_quant_ref(x2, gs)
    assert all(torch.equal(a, b) for a, b in zip((q2, s2), N.nvfp4_quant_ref(
        silu_and_mul_ref(x2), gs)))


def test_width_not_multiple_of_16_is_rejected():
    with pytest.raises(RuntimeError, match=r"hidden size \(40\) must be a multiple of 16"):
        N.nvfp4_quant_ref(torch.zeros(2, 40), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- vs vLLM


@pytest.mark.parametrize("m, n", SHAPES)
def test_matches_vllms_cpu_reference(m, n, monkeypatch):
    from vllm.model_executor.layers.quantization.utils import nvfp4_emulation_utils as emu
    from vllm.model_executor.layers.quantization.utils.nvfp4_utils import swizzle_blockscale

    g = _gen()
    y = _random(m, n, torch.bfloat16, g)
    gs = (N.E2M1_MAX * N.E4M3_MAX / y.float().abs().amax()).reshape(1)
    q, scales = N.nvfp4_quant_ref(y, gs)

    # vLLM's emulation reference: e2m1 values (fp32) and linear block scales (fp32).
    values, sf = emu.ref_nvfp4_quant(y.float(), gs, 16)
    assert torch.equal(N.e2m1_decode(N.unpack_e2m1(q)), values)
    assert torch.equal(N.unswizzle_block_scales(scales, m, n).float(), sf)
    # vLLM's unpacking of packed FP4 bytes.
    assert torch.equal(emu.break_fp4_bytes(q, torch.float32), values)
    # vLLM's swizzle of the GEMM's block scales (it moves the result to CUDA: stay on CPU).
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    theirs = swizzle_blockscale(sf.to(torch.float8_e4m3fn))
    assert torch.equal(theirs.contiguous().view(torch.uint8).flatten(),
                       scales.view(torch.uint8).flatten())
    # (It trims the padding rows; the padding blocks are cut here.)
    linear = emu.convert_swizzled_to_linear(scales.view(torch.uint8).view(torch.float8_e4m3fn),
                                            m, n, 16)
    assert torch.equal(linear[:, : n // 16].float(), sf)
