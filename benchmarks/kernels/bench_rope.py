"""Benchmark [per-head q/k RMSNorm +] RoPE + paged KV-cache write: vllm_fusion vs vLLM vs Inductor.

    python benchmarks/kernels/bench_rope.py [--tokens ...] [--variants llama qwen3]
        [--cache-dtypes bf16 fp8] [--heads 32 8] [--head-size 128] [--block-size 16]
        [--json out.json] [--plot out.png]

Geometry of Llama-3-8B / Qwen3-8B attention (32 q heads, 8 kv heads, head size 128), q, k, v
views of one qkv tensor, the FLASH_ATTN NHD cache (kv_cache [num_blocks, block_size, Hkv, 2D],
key / value the two halves of the last dim), random distinct slots, bf16 cos/sin cache (vLLM
converts it to the model dtype). Variants: ``llama`` (RoPE + KV-cache write) and ``qwen3``
(q/k RMSNorm + RoPE + KV-cache write). Implementations:

* ``vllm_fusion``: torch.ops.vllm_fusion.qk_norm_rope_kv_cache, one kernel.
* ``vllm``: vLLM 0.26's unfused CUDA ops: [``_C.rms_norm`` on the q and k heads,]
  ``_C.rotary_embedding`` in place, ``_C_cache_ops.reshape_and_cache_flash``.
* ``vllm_fused``: (qwen3 only) vLLM's ``_C.fused_qk_norm_rope`` in place on qkv, then
  ``reshape_and_cache_flash``.
* ``inductor``: torch.compile (default mode, static shapes) of the native norm + RoPE (vLLM's
  ``RotaryEmbedding.forward_static`` when importable, else vllm_fusion's reference) followed by
  ``reshape_and_cache_flash``: what vLLM -O2 runs with its custom ops disabled.

Baselines whose ops are not importable are skipped with a note. Bytes counted: q, k, v read; q, k
written; k, v written to the cache; the cos/sin rows, positions and slots read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Row,
    common_args,
    compile_inductor,
    finish,
    require_kernels,
    rotation,
    time_row,
    torch_dtype,
)

from vllm_fusion.ops import fp8_dtype  # noqa: E402
from vllm_fusion.ops.norm_quant import rms_norm_ref  # noqa: E402
from vllm_fusion.ops.rope import rope_ref  # noqa: E402

EPS = 1e-6
MAX_POS = 32768
VARIANTS = {"llama": False, "qwen3": True}  # variant -> q/k norm


def load_vllm() -> dict[str, bool]:
    """Which of vLLM's kernels are there."""
    have = {"rope": False, "cache": False, "norm": False, "fused_qk_norm_rope": False}
    try:
        import vllm._custom_ops  # noqa: F401, PLC0415
    except Exception as e:  # noqa: BLE001
        print(f"# vllm._custom_ops not importable ({type(e).__name__}: {e}): vLLM baselines "
              "skipped", file=sys.stderr)
        return have
    for key, ns, name in (("rope", "_C", "rotary_embedding"), ("norm", "_C", "rms_norm"),
                          ("fused_qk_norm_rope", "_C", "fused_qk_norm_rope"),
                          ("cache", "_C_cache_ops", "reshape_and_cache_flash")):
        try:
            getattr(getattr(torch.ops, ns), name)
            have[key] = True
        except (AttributeError, RuntimeError):
            print(f"# torch.ops.{ns}.{name} not available", file=sys.stderr)
    return have


def native_rope():
    """vLLM's native RoPE (dtype arithmetic) if importable, else vllm_fusion's reference."""
    try:
        from vllm.model_executor.layers.rotary_embedding.base import (  # noqa: PLC0415
            RotaryEmbedding,
        )

        def rope(pos, q, k, d, cache, neox):
            return RotaryEmbedding.forward_static(pos, q, k, d, cache.shape[1], cache, neox)

        return rope, "vLLM RotaryEmbedding.forward_static"
    except Exception:  # noqa: BLE001

        def rope(pos, q, k, d, cache, neox):
            return rope_ref(q, pos, cache, neox), rope_ref(k, pos, cache, neox)

        return rope, "vllm_fusion.ops.rope.rope_ref"


class Geometry:
    def __init__(self, hq, hkv, d, bs, tokens, dtype, cache_dtype):
        self.hq, self.hkv, self.d, self.bs, self.tokens = hq, hkv, d, bs, tokens
        self.dtype, self.cache_dtype = dtype, cache_dtype
        self.fp8 = cache_dtype != dtype
        self.num_blocks = (tokens + bs - 1) // bs + 1

    def split(self, qkv):
        d = self.d
        q, k, v = qkv.split([self.hq * d, self.hkv * d, self.hkv * d], dim=-1)
        return q, k, v

    def heads(self, x, h):
        return x.unflatten(-1, (h, self.d))

    def min_bytes(self) -> int:
        e = torch.finfo(self.dtype).bits // 8
        ce = 1 if self.fp8 else e
        per_token = ((self.hq + 2 * self.hkv) * self.d * e  # read q, k, v
                     + (self.hq + self.hkv) * self.d * e  # write q_out, k_out
                     + 2 * self.hkv * self.d * ce  # write the cache slots
                     + self.d * e  # one cos/sin row (bf16)
                     + 8 + 8)  # position, slot
        return self.tokens * per_token


_COMPILED: dict[bool, object] = {}


def compiled_norm_rope(norm: bool, d: int, cache, qw, kw):
    """torch.compile of the native [q/k RMSNorm +] RoPE, one per variant (Inductor still
    specializes on each token count: static shapes)."""
    if norm not in _COMPILED:
        rope, _ = native_rope()

        def norm_rope(q, k, pos):
            if norm:
                q = rms_norm_ref(q.unflatten(-1, (-1, d)), qw, EPS).flatten(-2)
                k = rms_norm_ref(k.unflatten(-1, (-1, d)), kw, EPS).flatten(-2)
            return rope(pos, q, k, d, cache, True)

        _COMPILED[norm] = compile_inductor(norm_rope)
    return _COMPILED[norm]


def make_impls(g: Geometry, norm: bool, have: dict[str, bool], cache, kc, vc, qw, kw, one):
    ops = torch.ops.vllm_fusion
    kv_dtype_str = "fp8" if g.fp8 else "auto"
    ks = vs = one if g.fp8 else None  # our op takes scales only for an fp8 cache
    impls = {}

    def ours(qkv, pos, slots):
        q, k, v = g.split(qkv)
        return ops.qk_norm_rope_kv_cache(g.heads(q, g.hq), g.heads(k, g.hkv), g.heads(v, g.hkv),
                                         pos, cache, True, qw if norm else None,
                                         kw if norm else None, EPS, kc, vc, slots, ks, vs)

    impls["vllm_fusion"] = ours
    if not have.get("cache"):
        return impls
    cache_ops = torch.ops._C_cache_ops

    def write_cache(k, v, slots):
        cache_ops.reshape_and_cache_flash(k, v, kc, vc, slots, kv_dtype_str, one, one)

    if have["rope"] and (have["norm"] or not norm):

        def vllm_unfused(qkv, pos, slots):
            q, k, v = g.split(qkv)
            if norm:  # vLLM's Qwen3 (vllm_c rms_norm impl): [T, H, D] strided views in,
                # new contiguous outputs
                qh, kh = g.heads(q, g.hq), g.heads(k, g.hkv)
                qn = torch.empty(qh.shape, dtype=g.dtype, device="cuda")
                kn = torch.empty(kh.shape, dtype=g.dtype, device="cuda")
                torch.ops._C.rms_norm(qn, qh, qw, EPS)
                torch.ops._C.rms_norm(kn, kh, kw, EPS)
                q, k = qn.view(g.tokens, -1), kn.view(g.tokens, -1)
            torch.ops._C.rotary_embedding(pos, q, k, g.d, cache, True)
            write_cache(g.heads(k, g.hkv), g.heads(v, g.hkv), slots)
            return q, k

        impls["vllm"] = vllm_unfused
    if norm and have["fused_qk_norm_rope"]:
        import vllm._custom_ops as vllm_ops  # noqa: PLC0415

        def vllm_fused(qkv, pos, slots):
            vllm_ops.fused_qk_norm_rope(qkv, g.hq, g.hkv, g.hkv, g.d, EPS, qw, kw, cache, True,
                                        pos)
            q, k, v = g.split(qkv)
            write_cache(g.heads(k, g.hkv), g.heads(v, g.hkv), slots)
            return q, k

        impls["vllm_fused"] = vllm_fused

    compiled = compiled_norm_rope(norm, g.d, cache, qw, kw)

    def inductor(qkv, pos, slots):
        q, k, v = g.split(qkv)
        q, k = compiled(q, k, pos)
        write_cache(g.heads(k, g.hkv), g.heads(v, g.hkv), slots)
        return q, k

    impls["inductor"] = inductor
    return impls


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.set_defaults(impls=["vllm_fusion", "vllm", "vllm_fused", "inductor"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cache-dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                   help="KV-cache dtype (bf16: the model dtype)")
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    require_kernels()
    dtype = torch_dtype(args.dtype)
    have = load_vllm() if set(args.impls) - {"vllm_fusion"} else {}
    if "inductor" in args.impls and have.get("cache"):
        print(f"# inductor RoPE: {native_rope()[1]}", file=sys.stderr)
    hq, hkv = args.heads
    d = args.head_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(MAX_POS, d, device="cuda", generator=gen).clamp(-1, 1).to(dtype)
    qw = torch.randn(d, device="cuda", generator=gen).to(dtype)
    kw = torch.randn(d, device="cuda", generator=gen).to(dtype)
    one = torch.ones(1, device="cuda")

    rows: list[Row] = []
    for variant in args.variants:
        norm = VARIANTS[variant]
        for cache_name in args.cache_dtypes:
            cache_dtype = dtype if cache_name == "bf16" else fp8_dtype()
            for tokens in args.tokens:
                g = Geometry(hq, hkv, d, args.block_size, tokens, dtype, cache_dtype)
                kv = torch.zeros(g.num_blocks, g.bs, hkv, 2 * d, dtype=cache_dtype, device="cuda")
                kc, vc = kv.split(d, dim=-1)
                impls = make_impls(g, norm, have, cache, kc, vc, qw, kw, one)
                wanted = [i for i in args.impls if i in impls]

                def make_set():
                    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda").to(dtype)
                    pos = torch.randint(0, MAX_POS, (tokens,), device="cuda")
                    slots = torch.randperm(g.num_blocks * g.bs, device="cuda")[:tokens]
                    return qkv, pos, slots

                sets = rotation(make_set, g.min_bytes())
                row = Row("rope_kv_cache", f"{variant}/{cache_name}", tokens, d, args.dtype,
                          g.min_bytes())
                rows.append(time_row(row, impls, wanted, sets, args.reps,
                                     f"{variant} cache={cache_name} T={tokens}"))
                del sets, kv, kc, vc
            torch.cuda.empty_cache()
    present = [i for i in args.impls if any(i in r.us for r in rows)]
    finish(rows, present, args, f"[q/k RMSNorm +] RoPE + KV-cache write (Hq={hq}, Hkv={hkv}, "
           f"D={d}, block {args.block_size})")


if __name__ == "__main__":
    main()
