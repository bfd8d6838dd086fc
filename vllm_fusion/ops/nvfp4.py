"""NVFP4 quantization: the pure-torch reference of vLLM 0.26's ``scaled_fp4_quant`` and its
output layout.

``scaled_fp4_quant(y, global_scale, is_sf_swizzled_layout=True)`` views ``y`` as ``[m, n]``
(``n`` a multiple of 16) and, per block of 16 consecutive elements of a row::

    sf   = e4m3(min(global_scale * (absmax * fp32(1/6)), 448))    the block scale
    inv  = 1 / (float(sf) * (1 / global_scale))   (0 when sf == 0)
    q    = e2m1(y * inv)        round to nearest even onto {0, 0.5, 1, 1.5, 2, 3, 4, 6},
                                saturating at 6, sign kept (also for zero)

It returns ``q`` packed two per byte, ``[m, n / 2]`` uint8, element ``2i`` in the low nibble
of byte ``i``, and the block scales swizzled for the CUTLASS / FlashInfer FP4 GEMMs: padded to
``[round_up(m, 128), round_up(n / 16, 4)]`` (padding 0) and stored as
``[m_tiles, k_tiles, 32, 4, 4]``, where row ``r`` and block ``b`` go to
``[r // 128, b // 4, r % 32, (r // 32) % 4, b % 4]``, the bytes seen as int32
``[round_up(m, 128), round_up(n / 16, 4) / 4]``.

The CUDA kernels take the reciprocals with ``rcp.approx.ftz`` as vLLM's kernel does; this
reference divides exactly. The two agree except where an approximate reciprocal lands one ulp
off and moves a value across an e2m1 rounding boundary (rare; a one-step difference).
Nothing here imports vLLM.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SF_TILE_ROWS = 128
SF_TILE_BLOCKS = 4

# e2m1 magnitude codes 0..7 -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _round_up(x, multiple: int):
    return (x + multiple - 1) // multiple * multiple


def check_width(n: int, what: str = "hidden size") -> None:
    """The kernels' check (same condition, RuntimeError like theirs)."""
    if n % BLOCK:
        raise RuntimeError(
            f"NVFP4 quantizes blocks of 16 elements: {what} ({n}) must be a multiple of 16"
        )


def scale_shape(m, n: int) -> tuple:
    """Shape of the swizzled int32 block-scale tensor for ``[m, n]`` (``m`` may be symbolic)."""
    return (_round_up(m, SF_TILE_ROWS), _round_up(n // BLOCK, SF_TILE_BLOCKS) // SF_TILE_BLOCKS)


def empty_outputs(like: torch.Tensor, m, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, block_scales)`` as the kernels allocate them (the fake impls use this)."""
    q = like.new_empty((m, n // 2), dtype=torch.uint8)
    return q, like.new_empty(scale_shape(m, n), dtype=torch.int32)


# ----------------------------------------------------------------------------- e2m1


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> 4-bit e2m1 codes (uint8, sign in bit 3), round to nearest even, saturating.

    The magnitude code counts the rounding thresholds |v| passes; a tie sits on a threshold
    and goes to the even code, hence ``>`` for thresholds below an odd code and ``>=`` below
    an even one. NaN saturates to 6 like ``cvt.rn.satfinite``'s largest finite value.
    """
    a = v.abs()
    code = torch.zeros_like(v, dtype=torch.uint8)
    for threshold, strict in ((0.25, True), (0.75, False), (1.25, True), (1.75, False),
                              (2.5, True), (3.5, False), (5.0, True)):
        code += (a > threshold if strict else a >= threshold).to(torch.uint8)
    code = torch.where(v.isnan(), torch.full_like(code, 7), code)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    values = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -values, values)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` codes -> ``[..., n / 2]`` bytes, element 2i in the low nibble of byte i."""
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n / 2]`` bytes -> ``[..., n]`` codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- block scales


def swizzle_block_scales(sf: torch.Tensor) -> torch.Tensor:
    """``[m, n / 16]`` e4m3 scales -> the swizzled int32 ``scale_shape(m, n)`` tensor."""
    m, blocks = sf.shape
    pm, pb = _round_up(m, SF_TILE_ROWS), _round_up(blocks, SF_TILE_BLOCKS)
    padded = torch.zeros((pm, pb), dtype=torch.uint8, device=sf.device)
    padded[:m, :blocks] = sf.view(torch.uint8)
    # [m_tile, (r // 32) % 4, r % 32, k_tile, b % 4] -> [m_tile, k_tile, r % 32, (r // 32) % 4, b % 4]
    tiles = padded.reshape(pm // SF_TILE_ROWS, 4, 32, pb // SF_TILE_BLOCKS, SF_TILE_BLOCKS)
    swizzled = tiles.permute(0, 3, 2, 1, 4).contiguous()
    return swizzled.view(torch.int32).reshape(pm, pb // SF_TILE_BLOCKS)


def unswizzle_block_scales(scales: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scales`: ``[m, n / 16]`` float8_e4m3fn."""
    pm, k_tiles = scales.shape
    tiles = scales.contiguous().view(torch.uint8).reshape(
        pm // SF_TILE_ROWS, k_tiles, 32, 4, SF_TILE_BLOCKS)
    linear = tiles.permute(0, 3, 2, 1, 4).reshape(pm, k_tiles * SF_TILE_BLOCKS)
    return linear[:m, : n // BLOCK].contiguous().view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- quantization


def nvfp4_block_quant(y: torch.Tensor, global_scale: torch.Tensor):
    """``y`` viewed as ``[m, n]`` -> (e2m1 codes ``[m, n]``, e4m3 block scales ``[m, n / 16]``)."""
    n = y.shape[-1]
    check_width(n)
    y32 = y.reshape(-1, n).to(torch.float32).unflatten(-1, (-1, BLOCK))
    gs = global_scale.to(torch.float32).reshape(())
    rcp6 = torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32, device=y.device)
    absmax = y32.abs().amax(dim=-1, keepdim=True)
    sf = (gs * (absmax * rcp6)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    sf32 = sf.to(torch.float32)
    inv = torch.where(sf32 != 0, 1.0 / (sf32 * (1.0 / gs)), torch.zeros_like(sf32))
    codes = e2m1_codes(y32 * inv).flatten(-2)
    return codes, sf.squeeze(-1)


def nvfp4_quant_ref(y: torch.Tensor, global_scale: torch.Tensor):
    """``scaled_fp4_quant(y, global_scale)`` (swizzled): (packed q, int32 block scales)."""
    codes, sf = nvfp4_block_quant(y, global_scale)
    return pack_e2m1(codes), swizzle_block_scales(sf)


def nvfp4_dequant_ref(q: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                      n: int) -> torch.Tensor:
    """fp32 ``[m, n]`` values of a quantized tensor: e2m1 * block scale / global scale."""
    m = q.shape[0]
    values = e2m1_decode(unpack_e2m1(q)).unflatten(-1, (-1, BLOCK))
    sf = unswizzle_block_scales(scales, m, n).to(torch.float32).unsqueeze(-1)
    return (values * sf / global_scale.to(torch.float32).reshape(())).flatten(-2)
