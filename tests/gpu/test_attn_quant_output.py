"""What ``fuse_attn_quant`` relies on, on the GPU: TRITON_ATTN's attention kernel called with an
``output_scale`` and an FP8 output (the fused graph) writes what the unfused graph computes,
the bf16/fp16 attention output quantized by ``_C.static_scaled_fp8_quant`` with that scale,
within one FP8 step; on fresh random inputs, over dtypes, head geometries, token counts
(decode on the 2D and on the split-KV 3D kernel, prefill, several sequences) and scales that
make some values saturate."""

from __future__ import annotations

import pytest

from tests.gpu import require_cuda_kernels

require_cuda_kernels(8, "FP8 attention output needs SM89+ (Triton FP8 stores)")

import torch  # noqa: E402

from tests.gpu.conftest import check_fp8_close  # noqa: E402

if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 attention output needs SM89+", allow_module_level=True)

BLOCK_SIZE = 16
FP8 = torch.float8_e4m3fn
# (query lengths, context lengths) per sequence: decode, one prefill, a mixed batch.
BATCHES = [([1], [37]), ([1, 1, 1], [300, 17, 1000]), ([7], [7]), ([300], [300]),
           ([1, 5, 33], [70, 5, 90])]


def paged_kv(context_lens, num_kv_heads, head_size, dtype):
    """Random K/V caches and a shuffled block table holding each sequence's context."""
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_size)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    order = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    table = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[start:start + n]
        start += n
    return k_cache, v_cache, table


def split_kv_buffers(num_seqs, num_heads, head_size, segments=16):
    """The tiled-softmax buffers TRITON_ATTN allocates; with them, a pure decode batch of at
    most ``num_seqs`` sequences runs the 3D (split-KV) kernel, as vLLM's decode does."""
    d = 1 << (head_size - 1).bit_length()
    f32 = {"dtype": torch.float32, "device": "cuda"}
    return {"seq_threshold_3D": num_seqs, "num_par_softmax_segments": segments,
            "softmax_segm_output": torch.empty(num_seqs, num_heads, segments, d, **f32),
            "softmax_segm_max": torch.empty(num_seqs, num_heads, segments, **f32),
            "softmax_segm_expsum": torch.empty(num_seqs, num_heads, segments, **f32)}


def run_attention(q, k_cache, v_cache, table, query_lens, context_lens, out, output_scale=None,
                  split_kv=None):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    seqused = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    ones = torch.ones(len(query_lens), k_cache.shape[2], dtype=torch.float32, device="cuda")
    unified_attention(
        q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=max(query_lens),
        seqused_k=seqused, max_seqlen_k=max(context_lens), softmax_scale=q.shape[-1] ** -0.5,
        causal=True, window_size=(-1, -1), block_table=table, softcap=0, q_descale=None,
        k_descale=ones, v_descale=ones, output_scale=output_scale, **(split_kv or {}))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_size", [(4, 2, 64), (8, 8, 128)])
@pytest.mark.parametrize("batch", BATCHES, ids=["decode", "decode3", "prefill7", "prefill300", "mixed"])
@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("split_kv", [False, True], ids=["2d", "3d"])
def test_fp8_output_equals_the_unfused_static_quant(dtype, num_heads, num_kv_heads, head_size,
                                                    batch, saturate, split_kv):
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    query_lens, context_lens = batch
    tokens = sum(query_lens)
    q = torch.randn(tokens, num_heads, head_size, dtype=dtype, device="cuda")
    k_cache, v_cache, table = paged_kv(context_lens, num_kv_heads, head_size, dtype)
    if split_kv and max(query_lens) > 1:
        pytest.skip("the 3D kernel runs only for decode batches")
    buffers = split_kv_buffers(len(query_lens), num_heads, head_size) if split_kv else None

    unfused = run_attention(q, k_cache, v_cache, table, query_lens, context_lens,
                            torch.empty_like(q), split_kv=buffers)
    amax = unfused.abs().amax().float()
    # A scale that uses the FP8 range, or one that saturates the largest values.
    scale = (amax / (100.0 if saturate else 448.0) * (1 + torch.rand(1, device="cuda"))).reshape(1)
    ref = torch.empty(tokens, num_heads * head_size, dtype=FP8, device="cuda")
    # Static per-tensor: scaled_fp8_quant with a scale runs _C.static_scaled_fp8_quant.
    ops.scaled_fp8_quant(unfused.reshape(tokens, -1), scale, output=ref)

    fused = torch.empty(tokens, num_heads, head_size, dtype=FP8, device="cuda")
    run_attention(q, k_cache, v_cache, table, query_lens, context_lens, fused, scale,
                  split_kv=buffers)

    check_fp8_close(fused.reshape(tokens, -1), scale, ref, scale,
                    what=f"TRITON_ATTN FP8 output ({dtype}, H={num_heads}, D={head_size})")
