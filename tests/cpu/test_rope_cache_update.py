"""The Python op ``vllm_fusion::rope_kv_cache_update`` writes each backend's KV cache where
the backend's own ``do_kv_cache_update`` does (FLASH_ATTN, TRITON_ATTN, FLASHINFER; NHD and
HND memory layouts; bf16 and fp8 caches), on CPU: the kernel is replaced by its torch
reference, and the backends' cache-write kernels by a CPU ``reshape_and_cache_flash``."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from tests.cpu.rope_kernel_shim import ensure_rope_kernel_op

BLOCK_SIZE, NUM_BLOCKS = 16, 4
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def shim():
    ensure_rope_kernel_op()


# ---------------------------------------------------------------- references

def _rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x, positions, cos_sin_cache, is_neox):
    rot = cos_sin_cache.shape[-1]
    cos = cos_sin_cache[positions.long(), : rot // 2].float().unsqueeze(1)
    sin = cos_sin_cache[positions.long(), rot // 2:].float().unsqueeze(1)
    x32 = x.float()
    if is_neox:
        a, b = x32[..., : rot // 2], x32[..., rot // 2: rot]
    else:
        a, b = x32[..., 0:rot:2], x32[..., 1:rot:2]
    a2, b2 = a * cos - b * sin, b * cos + a * sin
    out = x32.clone()
    if is_neox:
        out[..., : rot // 2], out[..., rot // 2: rot] = a2, b2
    else:
        out[..., 0:rot:2], out[..., 1:rot:2] = a2, b2
    return out.to(x.dtype)


def write_cache(key, value, key_cache, value_cache, slot_mapping, cache_dtype, k_scale, v_scale):
    """What vLLM's reshape_and_cache_flash does, on CPU (fp8: value / scale, saturated)."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        for src, dst, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
            row = src[t]
            if str(cache_dtype).startswith("fp8"):
                row = (row.float() / scale.float()).clamp(-448, 448).to(FP8)
                if dst.dtype == torch.uint8:
                    row = row.view(torch.uint8)
            dst[block, offset] = row.to(dst.dtype)


def kernel_reference(query, key, value, positions, cos_sin_cache, is_neox, q_weight, k_weight,
                     epsilon, key_cache, value_cache, slot_mapping, k_scale, v_scale):
    """The contract's semantics of vllm_fusion::qk_norm_rope_kv_cache, in torch."""
    if q_weight is not None:
        query, key = _rms_norm(query, q_weight, epsilon), _rms_norm(key, k_weight, epsilon)
    q_out = _rope(query, positions, cos_sin_cache, is_neox).contiguous()
    k_out = _rope(key, positions, cos_sin_cache, is_neox).contiguous()
    if key_cache is not None and slot_mapping is not None:
        fp8 = key_cache.dtype in (FP8, torch.uint8)
        write_cache(k_out, value, key_cache, value_cache, slot_mapping,
                    "fp8" if fp8 else "auto", k_scale, v_scale)
    return q_out, k_out


def package_reference():
    """vllm_fusion/ops/rope.py's reference once the kernel is merged, else this file's."""
    try:
        from vllm_fusion.ops.rope import qk_norm_rope_kv_cache_ref
    except ImportError:
        return kernel_reference
    return qk_norm_rope_kv_cache_ref


# ---------------------------------------------------------------- the backends' own writes

def backend_impl(backend: str, layer):
    """The backend's AttentionImpl with just what its do_kv_cache_update reads."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cls = AttentionBackendEnum[backend].get_class().get_impl_cls()
    impl = object.__new__(cls)
    impl.attn_type = AttentionType.DECODER
    impl.head_size = layer.head_size
    impl.num_kv_heads = layer.num_kv_heads
    impl.kv_cache_dtype = layer.kv_cache_dtype
    impl.kv_sharing_target_layer_name = None
    impl._is_per_token_head_quant = False
    impl.is_kvcache_nvfp4 = False
    impl.nvfp4_fa2 = False  # FLASHINFER, vLLM 0.33
    impl.cache_dtype = layer.kv_cache_dtype  # FLASHINFER, vLLM 0.33 (its kv_cache_dtype)
    impl._set_kv_ptr_range = False  # TRITON_ATTN, vLLM 0.33: no pointer-range bookkeeping
    impl.fp8_dtype = FP8
    return impl


@pytest.fixture
def cpu_cache_writes(monkeypatch):
    from vllm.v1.attention.backends import flash_attn, flashinfer, triton_attn

    monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", write_cache)
    monkeypatch.setattr(triton_attn, "triton_reshape_and_cache_flash", write_cache)
    monkeypatch.setattr(flashinfer.torch.ops._C_cache_ops, "reshape_and_cache_flash",
                        write_cache, raising=False)


def make_kv_cache(backend: str, layout: str, num_kv_heads: int, head_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The backend's logical (blocks, kv_heads, block_size, 2*head) cache, laid out in memory
    as vLLM allocates it for ``layout`` (its get_kv_cache_stride_order)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_fusion import compat

    cls = AttentionBackendEnum[backend].get_class()
    shape = compat.attention_kv_cache_shape(cls, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads,
                                            head_size, dtype)
    assert shape == (NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, 2 * head_size), shape
    order = (0, 2, 1, 3) if layout == "NHD" else (0, 1, 2, 3)
    physical = torch.zeros([shape[i] for i in order], dtype=dtype)
    inverse = [order.index(i) for i in range(4)]
    return physical.permute(*inverse)


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
def test_cache_written_where_the_backend_writes_it(backend, cpu_cache_writes, monkeypatch):
    # One forked test per backend (each costs a process): the cases loop inside.
    torch.manual_seed(0)
    for layout, cache_dtype, qk_norm in itertools.product(("NHD", "HND"), ("auto", "fp8"),
                                                          (False, True)):
        with monkeypatch.context() as patch:
            check_one_cache_write(backend, layout, cache_dtype, qk_norm, patch)


def check_one_cache_write(backend, layout, cache_dtype, qk_norm, monkeypatch):
    from vllm_fusion.ops import rope_cache_update

    heads, kv_heads, head_size, tokens, dtype = 4, 2, 64, 9, torch.bfloat16
    layer = types.SimpleNamespace(
        layer_name="layer", head_size=head_size, head_size_v=head_size, num_kv_heads=kv_heads,
        kv_cache_dtype=cache_dtype, _k_scale=torch.tensor(0.5), _v_scale=torch.tensor(0.25))
    layer.impl = backend_impl(backend, layer)
    cache_torch_dtype = torch.uint8 if cache_dtype == "fp8" else dtype
    ours = make_kv_cache(backend, layout, kv_heads, head_size, cache_torch_dtype)
    theirs = make_kv_cache(backend, layout, kv_heads, head_size, cache_torch_dtype)
    # Fewer slots than tokens (padding), one skipped token, slots across blocks.
    slot_mapping = torch.tensor([3, 17, -1, 40, 63, 0, 33], dtype=torch.int64)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, dtype=dtype)
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    q, k, v = (q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size),
               v.view(tokens, kv_heads, head_size))
    positions = torch.randint(0, 128, (tokens,))
    cos_sin = torch.randn(128, 48, dtype=torch.float32)  # partial rotary, fp32 cache
    weights = ((torch.rand(head_size, dtype=dtype) + 0.5, torch.rand(head_size, dtype=dtype) + 0.5)
               if qk_norm else (None, None))

    reference = package_reference()
    monkeypatch.setattr(rope_cache_update, "_kernel", lambda: reference)
    monkeypatch.setattr(rope_cache_update, "get_attention_context",
                        lambda name: (None, layer, ours, slot_mapping))
    q_out, k_out, dummy = rope_cache_update.rope_kv_cache_update_impl(
        q, k, v, positions, cos_sin, True, *weights, 1e-6, "layer")

    q_ref, k_ref = reference(q, k, v, positions, cos_sin, True, *weights, 1e-6,
                             None, None, None, None, None)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    assert dummy.numel() == 0 and dummy.dtype == ours.dtype
    # The backend's own write of the same rotated key and the value.
    layer.impl.do_kv_cache_update(layer, k_ref, v, theirs, slot_mapping)
    assert theirs.count_nonzero() > 0
    assert torch.equal(ours, theirs), (backend, layout, cache_dtype, qk_norm)


def test_profiling_run_without_slot_mapping_writes_nothing(monkeypatch):
    from vllm_fusion.ops import rope_cache_update

    calls = []

    def reference(*args):
        calls.append(args)
        return kernel_reference(*args)

    kv_cache = torch.zeros(NUM_BLOCKS, 2, BLOCK_SIZE, 128, dtype=torch.bfloat16)
    layer = types.SimpleNamespace(head_size=64, kv_cache_dtype="auto")
    monkeypatch.setattr(rope_cache_update, "_kernel", lambda: reference)
    monkeypatch.setattr(rope_cache_update, "get_attention_context",
                        lambda name: (None, layer, kv_cache, None))
    q = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    q_out, k_out, _ = rope_cache_update.rope_kv_cache_update_impl(
        q, k, k.clone(), torch.arange(3), torch.randn(16, 64), False, None, None, 0.0, "layer")
    assert calls[0][9:] == (None, None, None, None, None)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert kv_cache.count_nonzero() == 0


def test_fake_returns_contiguous_q_k_and_an_empty_dummy():
    from vllm_fusion.ops import rope_cache_update

    q = torch.empty(5, 256, dtype=torch.float16)[:, :128].view(5, 2, 64)
    k = torch.empty(5, 64, dtype=torch.float16).view(5, 1, 64)
    q_out, k_out, dummy = rope_cache_update.rope_kv_cache_update_fake(
        q, k, k, torch.arange(5), torch.empty(8, 64), True, None, None, 0.0, "layer")
    assert q_out.shape == q.shape and q_out.is_contiguous() and not q.is_contiguous()
    assert k_out.shape == k.shape and k_out.is_contiguous()
    assert dummy.numel() == 0


def test_op_is_registered_with_an_opaque_layer_name():
    from vllm.utils.torch_utils import _USE_LAYERNAME

    import vllm_fusion.ops.rope_cache_update  # noqa: F401

    schema = str(torch.ops.vllm_fusion.rope_kv_cache_update.default._schema)
    assert schema.startswith("vllm_fusion::rope_kv_cache_update(Tensor query, Tensor key, "
                             "Tensor value, Tensor positions, Tensor cos_sin_cache, bool is_neox, "
                             "Tensor? q_weight, Tensor? k_weight, float epsilon, "), schema
    assert schema.endswith("-> (Tensor, Tensor, Tensor)"), schema
    assert "(a!)" not in schema
    if _USE_LAYERNAME:
        assert "str layer_name" not in schema


SUPPORT_CASES = [
    ({}, None),
    ({"backend": "FLEX_ATTENTION"}, "attention backend FLEX_ATTENTION"),
    ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype fp8_e5m2"),
    ({"kv_cache_dtype": "int8_per_token_head"}, "kv_cache_dtype int8_per_token_head"),
    ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"},
     "shares the KV cache of model.layers.0.self_attn.attn"),
    ({"attn_type": "encoder_only"}, "attention type encoder_only"),
    ({"head_size": 576}, "head size 576"),
    ({"head_size": 63}, "head size 63"),
    ({"dtype": torch.float32}, "dtype torch.float32"),
]


def test_supported_layers():
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_fusion.ops.rope_cache_update import rope_kvcache_supported

    for attrs, reason in SUPPORT_CASES:
        backend = AttentionBackendEnum[attrs.get("backend", "FLASH_ATTN")].get_class()
        layer = types.SimpleNamespace(
            attn_backend=backend, head_size=attrs.get("head_size", 128),
            kv_cache_dtype=attrs.get("kv_cache_dtype", "auto"),
            kv_sharing_target_layer_name=attrs.get("kv_sharing_target_layer_name"),
            attn_type=attrs.get("attn_type", AttentionType.DECODER), impl=None)
        got = rope_kvcache_supported(layer, attrs.get("dtype", torch.bfloat16))
        if reason is None:
            assert got is None, attrs
        else:
            assert got is not None and got.startswith(reason), (attrs, got)
