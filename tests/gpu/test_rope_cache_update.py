"""``vllm_fusion::rope_kv_cache_update`` on the GPU with the real kernel: q_out / k_out equal
the kernel's own no-cache result, and the KV cache holds exactly what the backend's own
``do_kv_cache_update`` (vLLM's CUDA / Triton cache writes) writes for the same key and value,
for FLASH_ATTN, TRITON_ATTN and FLASHINFER caches in NHD and HND layouts, bf16 and fp8."""

from __future__ import annotations

import itertools
import types

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels()

import torch  # noqa: E402

if not hasattr(torch.ops.vllm_fusion, "qk_norm_rope_kv_cache"):
    pytest.skip("the kernel library lacks vllm_fusion::qk_norm_rope_kv_cache",
                allow_module_level=True)

from vllm_fusion.ops import rope_cache_update  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS = 16, 64
TOKENS = [0, 1, 7, 300]


def backend_impl(backend: str, layer):
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    impl = object.__new__(AttentionBackendEnum[backend].get_class().get_impl_cls())
    impl.attn_type = AttentionType.DECODER
    impl.head_size, impl.num_kv_heads = layer.head_size, layer.num_kv_heads
    impl.kv_cache_dtype = layer.kv_cache_dtype
    impl.kv_sharing_target_layer_name = None
    impl._is_per_token_head_quant = False
    impl.is_kvcache_nvfp4 = False
    impl.nvfp4_fa2 = False  # FLASHINFER, vLLM 0.33
    impl.cache_dtype = layer.kv_cache_dtype  # FLASHINFER, vLLM 0.33 (its kv_cache_dtype)
    impl._set_kv_ptr_range = False  # TRITON_ATTN, vLLM 0.33
    from vllm.platforms import current_platform

    impl.fp8_dtype = current_platform.fp8_dtype()
    return impl


def kv_cache_for(backend: str, layout: str, kv_heads: int, head_size: int, dtype):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_fusion import compat

    shape = compat.attention_kv_cache_shape(AttentionBackendEnum[backend].get_class(),
                                            NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_size, dtype)
    order = (0, 2, 1, 3) if layout == "NHD" else (0, 1, 2, 3)
    physical = torch.zeros([shape[i] for i in order], dtype=dtype, device="cuda")
    return physical.permute(*[order.index(i) for i in range(4)])


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_cache_matches_the_backends_own_write(backend, tokens, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    for layout, cache_dtype, qk_norm, (heads, kv_heads, head_size) in itertools.product(
            ("NHD", "HND"), ("auto", "fp8"), (False, True), ((8, 2, 128), (4, 4, 64))):
        dtype = torch.bfloat16
        layer = types.SimpleNamespace(
            head_size=head_size, head_size_v=head_size, num_kv_heads=kv_heads,
            kv_cache_dtype=cache_dtype,
            _k_scale=torch.tensor(0.5, device="cuda"), _v_scale=torch.tensor(0.25, device="cuda"))
        layer.impl = backend_impl(backend, layer)
        torch_cache_dtype = torch.uint8 if cache_dtype == "fp8" else dtype
        ours = kv_cache_for(backend, layout, kv_heads, head_size, torch_cache_dtype)
        theirs = kv_cache_for(backend, layout, kv_heads, head_size, torch_cache_dtype)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, dtype=dtype,
                          device="cuda", generator=gen)
        q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
        q, k, v = (q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size),
                   v.view(tokens, kv_heads, head_size))
        positions = torch.randint(0, 4096, (tokens,), device="cuda", generator=gen)
        cos_sin = torch.randn(4096, head_size, device="cuda", generator=gen)
        weights = ((torch.rand(head_size, dtype=dtype, device="cuda", generator=gen) + 0.5,) * 2
                   if qk_norm else (None, None))
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device="cuda", generator=gen)[:tokens]
        if tokens > 1:
            slots[1] = -1  # a padded token: skipped
        monkeypatch.setattr(rope_cache_update, "get_attention_context",
                            lambda name, c=ours, s=slots: (None, layer, c, s))
        q_out, k_out, _ = rope_cache_update.rope_kv_cache_update_impl(
            q, k, v, positions, cos_sin, True, *weights, 1e-6, "layer")
        q_ref, k_ref = torch.ops.vllm_fusion.qk_norm_rope_kv_cache(
            q, k, v, positions, cos_sin, True, *weights, 1e-6, None, None, None, None, None)
        case = (backend, tokens, layout, cache_dtype, qk_norm, heads, kv_heads, head_size)
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref), case
        if tokens:  # vLLM's reshape_and_cache_flash cannot launch an empty grid
            layer.impl.do_kv_cache_update(layer, k_ref, v, theirs, slots)
        torch.cuda.synchronize()
        if cache_dtype == "fp8":
            fp8 = layer.impl.fp8_dtype
            a, b = ours.view(fp8).float(), theirs.view(fp8).float()
            # Both are fp8(x / scale); allow one e4m3 step where rounding paths differ.
            torch.testing.assert_close(a, b, rtol=0.125, atol=2.0**-9, msg=str(case))
        else:
            assert torch.equal(ours, theirs), case
