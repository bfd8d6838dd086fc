"""The torch reference of qk_norm_rope_kv_cache (the spec of the kernel) against vLLM 0.26's own
RoPE (RotaryEmbedding.forward_static / forward_native, caches built by get_rope) and against
a plain per-token loop for the KV-cache write."""

from __future__ import annotations

import pytest
import torch

from vllm_fusion.ops.norm_quant import rms_norm_ref
from vllm_fusion.ops.rope import (
    kv_cache_write_ref,
    qk_norm_rope_kv_cache_ref,
    rope_ref,
)

BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


def _vllm_rope(head_size, rotary_dim, is_neox, rope_parameters=None, max_position=4096):
    """vLLM's RotaryEmbedding as models build it (fp32 cos/sin cache)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = dict(rope_parameters or {"rope_theta": 10000.0})
    if rotary_dim != head_size:
        params["partial_rotary_factor"] = rotary_dim / head_size
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_size, max_position, is_neox, params, torch.float32)
    assert rope.rotary_dim == rotary_dim
    return rope


def _inputs(gen, tokens, hq, hkv, d, dtype, max_position=4096):
    q = torch.randn(tokens, hq, d, generator=gen).to(dtype)
    k = torch.randn(tokens, hkv, d, generator=gen).to(dtype)
    pos = torch.randint(0, max_position, (tokens,), generator=gen)
    return q, k, pos


CASES = [  # head_size, rotary_dim, is_neox, rope_parameters
    (128, 128, True, None),
    (128, 128, False, None),
    (128, 64, True, None),  # partial rotary
    (128, 64, False, None),
    (64, 64, True, None),
    (96, 96, True, None),
    (128, 128, True, LLAMA3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"D{c[0]}-rot{c[1]}-"
                         f"{'neox' if c[2] else 'gptj'}{'-llama3' if c[3] else ''}")
def test_rope_matches_vllm_forward_static(case):
    """In fp32 the reference is vLLM's forward_static bit for bit; in bf16 / fp16 it is vLLM's
    fp32 computation rounded once (vLLM's bf16 path rounds after every op: one ulp off)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    d, rot, neox, params = case
    rope = _vllm_rope(d, rot, neox, params)
    cache = rope.cos_sin_cache
    gen = torch.Generator().manual_seed(d + rot + neox)
    q, k, pos = _inputs(gen, 37, 4, 2, d, torch.float32)

    vq, vk = RotaryEmbedding.forward_static(pos, q.clone(), k.clone(), d, rot, cache, neox)
    torch.testing.assert_close(rope_ref(q, pos, cache, neox), vq, rtol=0, atol=0)
    torch.testing.assert_close(rope_ref(k, pos, cache, neox), vk, rtol=0, atol=0)

    nq, nk = rope.forward_native(pos, q.clone(), k.clone())
    torch.testing.assert_close(rope_ref(q, pos, cache, neox), nq.view_as(q), rtol=0, atol=0)
    torch.testing.assert_close(rope_ref(k, pos, cache, neox), nk.view_as(k), rtol=0, atol=0)

    for dtype in (BF16, FP16):
        xq, xk = q.to(dtype), k.to(dtype)
        out_q, out_k = qk_norm_rope_kv_cache_ref(xq, xk, xk, pos, cache, neox, None, None, 1e-6)
        fq, fk = RotaryEmbedding.forward_static(pos, xq.float(), xk.float(), d, rot, cache, neox)
        torch.testing.assert_close(out_q, fq.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(out_k, fk.to(dtype), rtol=0, atol=0)
        # vLLM's own dtype arithmetic: within a couple of ulps.
        lq, _ = RotaryEmbedding.forward_static(pos, xq.clone(), xk.clone(), d, rot,
                                               cache.to(dtype), neox)
        torch.testing.assert_close(out_q.float(), lq.float(), rtol=2 * torch.finfo(dtype).eps,
                                   atol=2 * torch.finfo(dtype).eps)


def test_llama3_scaling_changes_the_cache():
    """The llama3 case above really uses a rescaled cache (not the default frequencies)."""
    plain = _vllm_rope(128, 128, True).cos_sin_cache
    scaled = _vllm_rope(128, 128, True, LLAMA3).cos_sin_cache
    assert plain.shape == scaled.shape
    assert not torch.equal(plain, scaled)


def test_rope_passes_dims_beyond_rot_through():
    gen = torch.Generator().manual_seed(1)
    q, _, pos = _inputs(gen, 9, 3, 1, 128, BF16)
    cache = torch.randn(4096, 32, generator=gen)
    out = rope_ref(q, pos, cache, True)
    assert torch.equal(out[..., 32:], q[..., 32:])
    assert not torch.equal(out[..., :32], q[..., :32])


def test_qk_norm_is_per_head_rms_norm_then_rope():
    gen = torch.Generator().manual_seed(2)
    q, k, pos = _inputs(gen, 11, 4, 2, 128, BF16)
    wq = torch.randn(128, generator=gen).to(BF16)
    wk = torch.randn(128, generator=gen).to(BF16)
    cache = _vllm_rope(128, 128, True).cos_sin_cache
    out_q, out_k = qk_norm_rope_kv_cache_ref(q, k, k, pos, cache, True, wq, wk, 1e-6)
    torch.testing.assert_close(out_q, rope_ref(rms_norm_ref(q, wq, 1e-6), pos, cache, True),
                               rtol=0, atol=0)
    # Per head: each [D] row normalized on its own.
    head = rms_norm_ref(k[3, 1], wk, 1e-6)
    torch.testing.assert_close(out_k[3, 1], rope_ref(head.view(1, 1, -1), pos[3:4], cache,
                                                     True)[0, 0], rtol=0, atol=0)
    assert out_q.is_contiguous() and out_k.is_contiguous()


def _loop_cache_write(key, value, key_cache, value_cache, slot_mapping):
    bs = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // bs, slot % bs] = key[t]
        value_cache[slot // bs, slot % bs] = value[t]


def _flash_caches(num_blocks, bs, h, d, dtype, fill=float("nan")):
    """vLLM 0.26 FLASH_ATTN NHD: kv_cache [nb, bs, H, 2D] (logical [nb, H, bs, 2D] permuted),
    key / value = kv_cache.transpose(1, 2).split(D, -1) of the logical view: non-contiguous."""
    kv = torch.full((num_blocks, bs, h, 2 * d), fill, dtype=dtype).transpose(1, 2)
    return kv.transpose(1, 2).split(d, dim=-1)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_cache_write_matches_a_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, hkv, d, bs = 13, 2, 64, 16
    q, k, pos = _inputs(gen, tokens, 4, hkv, d, dtype)
    v = torch.randn(tokens, hkv, d, generator=gen).to(dtype)
    cache = torch.randn(4096, d, generator=gen)
    slots = torch.randperm(5 * bs, generator=gen)[:tokens - 3]
    slots[[1, 4]] = -1  # padding: skipped
    kc, vc = _flash_caches(5, bs, hkv, d, dtype)
    _, k_out = qk_norm_rope_kv_cache_ref(q, k, v, pos, cache, False, None, None, 1e-6, kc, vc,
                                         slots)
    ek, ev = _flash_caches(5, bs, hkv, d, dtype)
    _loop_cache_write(k_out, v, ek, ev, slots)
    assert torch.equal(kc.nan_to_num(7.0), ek.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), ev.nan_to_num(7.0))
    written = (slots >= 0).sum().item()
    assert written == tokens - 5
    # Exactly the valid slots changed (the rest is still NaN); tokens beyond N are not written.
    assert (~kc.isnan()).all(-1).all(-1).sum().item() == written
    assert k_out.shape == (tokens, hkv, d)


@pytest.mark.parametrize("cache_dtype", [FP8, torch.uint8])
def test_fp8_cache_write(cache_dtype):
    gen = torch.Generator().manual_seed(4)
    tokens, hkv, d, bs = 8, 2, 128, 16
    q, k, pos = _inputs(gen, tokens, 4, hkv, d, BF16)
    k = k * 40  # some values saturate at 448 after the scale
    v = torch.randn(tokens, hkv, d, generator=gen).to(BF16)
    cache = _vllm_rope(d, d, True).cos_sin_cache
    k_scale, v_scale = torch.tensor([0.05]), torch.tensor([0.01])
    kc = torch.zeros(2, bs, hkv, d, dtype=cache_dtype)
    vc = torch.zeros(2, bs, hkv, d, dtype=cache_dtype)
    slots = torch.tensor([3, -1, 17, 0, 30, 31, 8, -1])
    _, k_out = qk_norm_rope_kv_cache_ref(q, k, v, pos, cache, True, None, None, 1e-6, kc, vc,
                                         slots, k_scale, v_scale)
    kf = kc.view(FP8) if cache_dtype == torch.uint8 else kc
    vf = vc.view(FP8) if cache_dtype == torch.uint8 else vc
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        want_k = (k_out[t].float() / 0.05).clamp(-448, 448).to(FP8)
        want_v = (v[t].float() / 0.01).clamp(-448, 448).to(FP8)
        assert torch.equal(kf[slot // bs, slot % bs].view(torch.uint8), want_k.view(torch.uint8))
        assert torch.equal(vf[slot // bs, slot % bs].view(torch.uint8), want_v.view(torch.uint8))
    assert kf.float().abs().max().item() == 448.0  # saturated, not inf / NaN
    # Within one fp8 step of the unquantized values where not saturated.
    back = kf[0, 3].float() * 0.05
    ok = (k_out[0].float() / 0.05).abs() < 448
    assert torch.allclose(back[ok], k_out[0].float()[ok], rtol=2 ** -3, atol=0.05 * 2 ** -9)


def test_kv_cache_write_ref_skips_tokens_beyond_the_slot_mapping():
    k = torch.randn(6, 1, 8).to(BF16)
    kc, vc = torch.zeros(1, 16, 1, 8, dtype=BF16), torch.zeros(1, 16, 1, 8, dtype=BF16)
    kv_cache_write_ref(k, k, kc, vc, torch.tensor([5, 6]))
    assert torch.equal(kc[0, 5], k[0]) and torch.equal(kc[0, 6], k[1])
    assert kc.count_nonzero() == k[:2].count_nonzero()


def test_reference_runs_the_kernel_checks():
    q = torch.zeros(3, 4, 128, dtype=BF16)
    with pytest.raises(RuntimeError, match="rotary_dim .* must be even"):
        qk_norm_rope_kv_cache_ref(q, q, q, torch.arange(3), torch.zeros(8, 7), True, None,
                                  None, 1e-6)
