"""Inputs shaped like vLLM's, shared by the GPU tests and the kernel benchmarks (as
``flashinfer.testing``): paged KV caches and vLLM's TRITON_ATTN attention call."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def paged_kv_cache(context_lens: Sequence[int], num_kv_heads: int, head_size: int,
                   dtype: torch.dtype, *, block_size: int = 16, spare_blocks: int = 0,
                   device: str = "cuda"):
    """Random K and V caches ``[blocks, block_size, kv_heads, head_size]`` and a block table whose
    row i holds the blocks of sequence i's context, in shuffled order (as after many
    allocations); ``spare_blocks`` blocks more that no sequence uses."""
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    order = torch.randperm(num_blocks, device=device, dtype=torch.int32)
    table = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[start:start + n]
        start += n
    return k_cache, v_cache, table


class TritonAttention:
    """vLLM's TRITON_ATTN ``unified_attention`` for one batch layout, its metadata built once
    (as the backend builds it per step, outside the timed kernels).

    ``split_kv_seqs``: allocate TRITON_ATTN's tiled-softmax buffers for that many sequences, so
    that a pure decode batch of at most as many sequences runs the split-KV (3D) kernel, as
    vLLM's decode does; None: the 2D kernel only.
    """

    SOFTMAX_SEGMENTS = 16  # TRITON_ATTN's NUM_PAR_SOFTMAX_SEGMENTS

    def __init__(self, query_lens: Sequence[int], context_lens: Sequence[int], num_heads: int,
                 num_kv_heads: int, head_size: int, *, split_kv_seqs: int | None = None):
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        self.fn = unified_attention
        i32 = {"dtype": torch.int32, "device": "cuda"}
        self.cu_seqlens_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], **i32)
        self.seqused_k = torch.tensor(context_lens, **i32)
        self.max_q, self.max_k = max(query_lens), max(context_lens)
        self.descale = torch.ones(len(query_lens), num_kv_heads, dtype=torch.float32,
                                  device="cuda")
        self.softmax_scale = head_size ** -0.5
        self.split_kv = {} if split_kv_seqs is None else \
            self.split_kv_buffers(split_kv_seqs, num_heads, head_size)

    @classmethod
    def split_kv_buffers(cls, num_seqs: int, num_heads: int, head_size: int) -> dict:
        padded = 1 << (head_size - 1).bit_length()
        segments = cls.SOFTMAX_SEGMENTS
        f32 = {"dtype": torch.float32, "device": "cuda"}
        return {"seq_threshold_3D": num_seqs, "num_par_softmax_segments": segments,
                "softmax_segm_output": torch.empty(num_seqs, num_heads, segments, padded, **f32),
                "softmax_segm_max": torch.empty(num_seqs, num_heads, segments, **f32),
                "softmax_segm_expsum": torch.empty(num_seqs, num_heads, segments, **f32)}

    def __call__(self, q, k_cache, v_cache, table, out, output_scale=None):
        """Attention of ``q`` over the paged caches into ``out`` (FP8 with ``output_scale``)."""
        self.fn(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=self.cu_seqlens_q,
                max_seqlen_q=self.max_q, seqused_k=self.seqused_k, max_seqlen_k=self.max_k,
                softmax_scale=self.softmax_scale, causal=True, window_size=(-1, -1),
                block_table=table, softcap=0, q_descale=None, k_descale=self.descale,
                v_descale=self.descale, output_scale=output_scale, **self.split_kv)
        return out
