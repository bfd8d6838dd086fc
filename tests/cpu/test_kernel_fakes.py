"""The fake impls of torch.ops.vllm_fusion.* give the shapes, dtypes and strides the CUDA
kernels allocate, on fake CUDA tensors (no GPU needed). Skipped without vllm_fusion._C."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

if importlib.util.find_spec("vllm_fusion._C") is None:
    pytest.skip("vllm_fusion._C is not built", allow_module_level=True)

from vllm_fusion import _kernels  # noqa: E402

_status = _kernels.load()
if not _status.loaded:
    pytest.skip(_status.describe(), allow_module_level=True)

OPS = torch.ops.vllm_fusion
FP8 = torch.float8_e4m3fn
CUDA = torch.device("cuda")


def _contig_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)  # torch: a size-0 dim counts as 1
    return tuple(reversed(strides))


def _colmajor_strides(shape):
    """Strides of the transpose of a contiguous [..., shape[-1], shape[-2]]."""
    lead, rows, cols = tuple(shape[:-2]), shape[-2], shape[-1]
    base = _contig_strides((*lead, cols, rows))
    return (*base[:-2], base[-1], base[-2])


@pytest.fixture
def fake():
    with FakeTensorMode() as mode:
        yield mode


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device=CUDA)


SHAPES = [(7, 4096), (2, 5, 4096), (0, 256)]


@pytest.mark.parametrize("shape", SHAPES)
def test_static_norm_fakes(fake, shape):
    x, w, s = _t(*shape), _t(shape[-1]), _t(1, dtype=torch.float32)
    q = OPS.rms_norm_static_fp8_quant(x, w, s, 1e-6)
    assert (q.shape, q.dtype, q.stride(), q.device.type) == (x.shape, FP8, x.stride(), "cuda")
    q, r = OPS.fused_add_rms_norm_static_fp8_quant(x, x, w, s, 1e-6)
    assert (q.shape, q.dtype, q.stride()) == (x.shape, FP8, x.stride())
    assert (r.shape, r.dtype, r.stride()) == (x.shape, torch.bfloat16, x.stride())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("group", [0, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_dynamic_norm_fakes(fake, shape, group, transposed):
    x, w = _t(*shape, dtype=torch.float16), _t(shape[-1], dtype=torch.float16)
    ngroups = shape[-1] // group if group else 1
    s_shape = (*shape[:-1], ngroups)
    s_strides = _colmajor_strides(s_shape) if transposed else _contig_strides(s_shape)
    ue8m0 = group > 0
    q, s = OPS.rms_norm_dynamic_fp8_quant(x, w, 1e-5, group, transposed, ue8m0, None)
    assert (q.shape, q.dtype, q.stride()) == (x.shape, FP8, x.stride())
    assert (tuple(s.shape), s.dtype, s.stride()) == (s_shape, torch.float32, s_strides)
    q, r, s = OPS.fused_add_rms_norm_dynamic_fp8_quant(x, x, w, 1e-5, group, transposed, ue8m0,
                                                        _t(1, dtype=torch.float32))
    assert (q.shape, q.dtype) == (x.shape, FP8)
    assert (r.shape, r.dtype, r.stride()) == (x.shape, torch.float16, x.stride())
    assert (tuple(s.shape), s.dtype, s.stride()) == (s_shape, torch.float32, s_strides)


def test_norm_fake_output_is_contiguous_for_strided_input(fake):
    x = _t(7, 4160)[:, :4096]
    q = OPS.rms_norm_static_fp8_quant(x, _t(4096), _t(1, dtype=torch.float32), 1e-6)
    assert q.stride() == (4096, 1)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("group", [0, 64, 128])
@pytest.mark.parametrize("shape", [(7, 8192), (2, 5, 8192), (0, 256)])
def test_silu_fakes(fake, shape, group, transposed):
    x = _t(*shape)
    out_shape = (*shape[:-1], shape[-1] // 2)
    q = OPS.silu_and_mul_static_fp8_quant(x, _t(1, dtype=torch.float32))
    assert (tuple(q.shape), q.dtype, q.stride()) == (out_shape, FP8, _contig_strides(out_shape))
    ngroups = out_shape[-1] // group if group else 1
    s_shape = (*out_shape[:-1], ngroups)
    s_strides = _colmajor_strides(s_shape) if transposed else _contig_strides(s_shape)
    q, s = OPS.silu_and_mul_dynamic_fp8_quant(x, group, transposed, False, None)
    assert (tuple(q.shape), q.dtype) == (out_shape, FP8)
    assert (tuple(s.shape), s.dtype, s.stride()) == (s_shape, torch.float32, s_strides)


def test_fakes_reject_bad_group(fake):
    with pytest.raises(RuntimeError, match="divisible by group_size 128"):
        OPS.rms_norm_dynamic_fp8_quant(_t(4, 2880), _t(2880), 1e-6, 128, False, False, None)
    with pytest.raises(RuntimeError, match="must be even"):
        OPS.silu_and_mul_static_fp8_quant(_t(4, 255), _t(1, dtype=torch.float32))


@pytest.mark.parametrize("shape, padded", [((7, 2880), 3072), ((2, 5, 2880), 2944),
                                           ((0, 64), 128), ((3, 200), 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_pad_fakes(fake, shape, padded, dtype):
    x, w = _t(*shape, dtype=dtype), _t(shape[-1], dtype=dtype)
    out_shape = (*shape[:-1], padded)
    out = OPS.rms_norm_pad(x, w, 1e-5, padded)
    assert (tuple(out.shape), out.dtype, out.stride()) == (out_shape, dtype,
                                                            _contig_strides(out_shape))
    out, r = OPS.fused_add_rms_norm_pad(x, x, w, 1e-6, padded)
    assert (tuple(out.shape), out.dtype, out.stride()) == (out_shape, dtype,
                                                            _contig_strides(out_shape))
    assert (r.shape, r.dtype, r.stride()) == (x.shape, dtype, x.stride())


def test_norm_pad_fake_rejects_a_narrower_padded_size(fake):
    with pytest.raises(RuntimeError, match="padded_hidden must be at least the hidden size 2880"):
        OPS.fused_add_rms_norm_pad(_t(4, 2880), _t(4, 2880), _t(2880), 1e-6, 2816)


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("cache", [None, torch.bfloat16, FP8])
def test_rope_kv_cache_fake(fake, tokens, cache):
    # q / k / v: views of one qkv [T, (32 + 2 * 8) * 128] tensor.
    qkv = _t(tokens, 48 * 128)
    q, k, v = (t.view(tokens, h, 128) for t, h in zip(qkv.split([32 * 128, 8 * 128, 8 * 128], -1),
                                                       (32, 8, 8)))
    kv = {}
    if cache is not None:
        caches = _t(10, 16, 8, 256, dtype=cache).split(128, -1)
        kv = dict(key_cache=caches[0], value_cache=caches[1], slot_mapping=_t(tokens, dtype=torch.int64))
        if cache == FP8:
            kv.update(k_scale=_t(1, dtype=torch.float32), v_scale=_t(1, dtype=torch.float32))
    args = dict(key_cache=None, value_cache=None, slot_mapping=None, k_scale=None, v_scale=None)
    args.update(kv)
    q_out, k_out = OPS.qk_norm_rope_kv_cache(
        q, k, v, _t(tokens, dtype=torch.int64), _t(4096, 128, dtype=torch.float32), True,
        _t(128), _t(128), 1e-6, *args.values())
    assert (q_out.shape, q_out.dtype, q_out.stride()) == ((tokens, 32, 128), torch.bfloat16,
                                                          _contig_strides((tokens, 32, 128)))
    assert (k_out.shape, k_out.dtype, k_out.stride()) == ((tokens, 8, 128), torch.bfloat16,
                                                          _contig_strides((tokens, 8, 128)))
