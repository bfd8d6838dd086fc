"""Benchmark attention + static FP8 output quant: TRITON_ATTN's fused FP8 epilogue vs unfused.

    python benchmarks/kernels/bench_attn_quant.py [--decode-batches 1 16 64 256]
        [--context 1024] [--prefill 512 2048] [--heads 32 8] [--head-size 128]
        [--json out.json] [--plot out.png]

What ``fuse_attn_quant`` changes on TRITON_ATTN: the attention kernel is called with an FP8
output and ``output_scale`` and quantizes in its epilogue, instead of writing bf16 that a second
kernel reads back and quantizes for the FP8 o_proj GEMM. Geometry of Llama-3-8B (32 q heads,
8 kv heads, head size 128), a paged bf16 KV cache (block 16, shuffled blocks). Decode batches of
at most 16 sequences run the split-KV (3D) kernel with the tiled-softmax buffers, as vLLM's decode
does; larger ones and prefills the 2D kernel. Implementations:

* ``fused``: ``unified_attention(out=fp8, output_scale=scale)``, one kernel (the fused graph).
* ``vllm_quant``: ``unified_attention`` to bf16, then ``_C.static_scaled_fp8_quant`` (vLLM -O2
  with the ``+quant_fp8`` custom op).
* ``inductor``: ``unified_attention`` to bf16, then torch.compile of the native quant (vLLM -O2
  default).

Bytes counted: q read, the K/V context read once per kv head, the FP8 output written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, common_args, compile_inductor, finish, rotation, time_row  # noqa: E402

from vllm_fusion.ops import fp8_dtype  # noqa: E402
from vllm_fusion.ops.fp8 import static_fp8_quant_ref  # noqa: E402
from vllm_fusion.testing import TritonAttention, paged_kv_cache  # noqa: E402

BLOCK = 16
SPLIT_KV_MAX_SEQS = 16  # TRITON_ATTN's 3D threshold: 128 // kv heads for 8 kv heads


def make_batch(query_lens, context_lens, hq, hkv, d, dtype):
    """q and the paged K/V caches with their block table."""
    q = torch.randn(sum(query_lens), hq, d, device="cuda").to(dtype)
    return (q, *paged_kv_cache(context_lens, hkv, d, dtype, block_size=BLOCK))


def attention_for(query_lens, context_lens, hq, hkv, d) -> TritonAttention:
    """Decode batches of at most SPLIT_KV_MAX_SEQS run the 3D kernel, as in vLLM."""
    decode_3d = max(query_lens) == 1 and len(query_lens) <= SPLIT_KV_MAX_SEQS
    return TritonAttention(query_lens, context_lens, hq, hkv, d,
                           split_kv_seqs=SPLIT_KV_MAX_SEQS if decode_3d else None)


def make_impls(attn: TritonAttention, scale: torch.Tensor, fp8: torch.dtype) -> dict:
    def fused(q, k, v, table):
        return attn(q, k, v, table, torch.empty(q.shape, dtype=fp8, device="cuda"), scale)

    def vllm_quant(q, k, v, table):
        y = attn(q, k, v, table, torch.empty_like(q)).view(q.shape[0], -1)
        out = torch.empty(y.shape, dtype=fp8, device="cuda")
        torch.ops._C.static_scaled_fp8_quant(out, y, scale, None)
        return out

    quant = compile_inductor(lambda y: static_fp8_quant_ref(y, scale, fp8))

    def inductor(q, k, v, table):
        return quant(attn(q, k, v, table, torch.empty_like(q)).view(q.shape[0], -1))

    impls = {"fused": fused, "inductor": inductor}
    try:
        import vllm._custom_ops  # noqa: F401, PLC0415

        torch.ops._C.static_scaled_fp8_quant  # noqa: B018
        impls["vllm_quant"] = vllm_quant
    except (ImportError, AttributeError, RuntimeError) as e:
        print(f"# vLLM's static_scaled_fp8_quant unavailable ({e}): vllm_quant skipped",
              file=sys.stderr)
    return impls


def cases(args) -> list[tuple[str, list[int], list[int]]]:
    out = [(f"decode ctx{args.context}", [1] * b, [args.context] * b)
           for b in args.decode_batches]
    out += [("prefill", [t], [t]) for t in args.prefill]
    return out


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.set_defaults(impls=["fused", "vllm_quant", "inductor"])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, default=1024, help="context length of decode rows")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048],
                   help="prefill lengths (one sequence each)")
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    p.add_argument("--head-size", type=int, default=128)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    hq, hkv = args.heads
    d = args.head_size
    fp8 = fp8_dtype()
    rows = []
    for scheme, query_lens, context_lens in cases(args):
        attn = attention_for(query_lens, context_lens, hq, hkv, d)
        tokens, kv_tokens = sum(query_lens), sum(context_lens)
        nbytes = tokens * hq * d * (dtype.itemsize + 1) + 2 * kv_tokens * hkv * d * dtype.itemsize
        sets = rotation(lambda: make_batch(query_lens, context_lens, hq, hkv, d, dtype), nbytes)
        # A scale that spreads the attention output over the FP8 range.
        y = attn(*sets[0], torch.empty_like(sets[0][0]))
        scale = (y.abs().amax().float() / 448.0).reshape(1)
        impls = make_impls(attn, scale, fp8)
        row = Row("attn_quant", scheme, tokens, hq * d, args.dtype, nbytes)
        rows.append(time_row(row, impls, [i for i in args.impls if i in impls], sets, args.reps,
                             f"{scheme} T={tokens}"))
        del sets
        torch.cuda.empty_cache()
    present = [i for i in args.impls if any(i in r.us for r in rows)]
    finish(rows, present, args, f"TRITON_ATTN + static FP8 output quant (Hq={hq}, Hkv={hkv}, "
           f"D={d}, block {BLOCK})")


if __name__ == "__main__":
    main()
