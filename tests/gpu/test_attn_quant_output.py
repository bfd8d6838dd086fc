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
from vllm_fusion.testing import TritonAttention, paged_kv_cache  # noqa: E402

if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 attention output needs SM89+", allow_module_level=True)

FP8 = torch.float8_e4m3fn
# (query lengths, context lengths) per sequence: decode, one prefill, a mixed batch.
BATCHES = [([1], [37]), ([1, 1, 1], [300, 17, 1000]), ([7], [7]), ([300], [300]),
           ([1, 5, 33], [70, 5, 90])]


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
    kv = paged_kv_cache(context_lens, num_kv_heads, head_size, dtype, spare_blocks=3)
    if split_kv and max(query_lens) > 1:
        pytest.skip("the 3D kernel runs only for decode batches")
    attention = TritonAttention(query_lens, context_lens, num_heads, num_kv_heads, head_size,
                                split_kv_seqs=len(query_lens) if split_kv else None)

    unfused = attention(q, *kv, torch.empty_like(q))
    amax = unfused.abs().amax().float()
    # A scale that uses the FP8 range, or one that saturates the largest values.
    scale = (amax / (100.0 if saturate else 448.0) * (1 + torch.rand(1, device="cuda"))).reshape(1)
    ref = torch.empty(tokens, num_heads * head_size, dtype=FP8, device="cuda")
    # Static per-tensor: scaled_fp8_quant with a scale runs _C.static_scaled_fp8_quant.
    ops.scaled_fp8_quant(unfused.reshape(tokens, -1), scale, output=ref)

    fused = torch.empty(tokens, num_heads, head_size, dtype=FP8, device="cuda")
    attention(q, *kv, fused, scale)

    check_fp8_close(fused.reshape(tokens, -1), scale, ref, scale,
                    what=f"TRITON_ATTN FP8 output ({dtype}, H={num_heads}, D={head_size})")
