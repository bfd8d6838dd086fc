"""Benchmark residual add + RMSNorm + hidden padding: vllm_fusion's kernel vs Inductor vs vLLM's.

    python benchmarks/kernels/bench_norm_pad.py [--tokens ...] [--hidden 2880]
        [--multiple 256] [--schemes res plain] [--json out.json] [--plot out.png]

The MoE input of gpt-oss: hidden 2880 padded to 3072 (the next multiple of 256).
Implementations: ``vllm_fusion`` (torch.ops.vllm_fusion.fused_add_rms_norm_pad / rms_norm_pad),
``inductor`` (torch.compile of the torch reference in vllm_fusion.ops, i.e. the native norm and
the F.pad that vLLM 0.26 compiles by default, default mode, static shapes) and ``vllm``
(vLLM 0.26's torch.ops._C fused_add_rms_norm / rms_norm kernel then F.pad, when vllm or
--vllm-lib is available; the fused-add kernel updates its inputs in place).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Row,
    common_args,
    compile_inductor,
    finish,
    parse_and_load,
    rotation,
    time_row,
)

from vllm_fusion import ops as vf  # noqa: E402

EPS = 1e-5  # gpt-oss
SCHEMES = {"res": True, "plain": False}  # scheme -> residual add


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def minimal_bytes(tokens: int, hidden: int, padded: int, elem: int, residual: bool) -> int:
    b = tokens * hidden * elem + hidden * elem + tokens * padded * elem  # input, weight, out
    if residual:
        b += 2 * tokens * hidden * elem  # residual in, residual_out
    return b


def make_impls(residual: bool, padded: int, have_vllm: bool):
    ops = torch.ops.vllm_fusion
    impls = {}
    if residual:
        impls["vllm_fusion"] = lambda x, r, w: ops.fused_add_rms_norm_pad(x, r, w, EPS, padded)
        ref = vf.fused_add_rms_norm_pad_ref
        impls["inductor"] = compile_inductor(lambda x, r, w: ref(x, r, w, EPS, padded))
    else:
        impls["vllm_fusion"] = lambda x, r, w: ops.rms_norm_pad(x, w, EPS, padded)
        ref = vf.rms_norm_pad_ref
        impls["inductor"] = compile_inductor(lambda x, r, w: ref(x, w, EPS, padded))
    if have_vllm:
        c = torch.ops._C

        def vllm_norm_then_pad(x, r, w):
            if residual:  # x <- norm(x + r), r <- x + r, in place
                c.fused_add_rms_norm(x, r, w, EPS)
                y = x
            else:
                y = torch.empty_like(x)
                c.rms_norm(y, x, w, EPS)
            return F.pad(y, (0, padded - x.shape[-1]), mode="constant", value=0.0)

        impls["vllm"] = vllm_norm_then_pad
    return impls


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.set_defaults(hidden=[2880])
    p.add_argument("--multiple", type=int, default=256,
                   help="pad the hidden size up to a multiple of this (gpt-oss: 128 or 256)")
    p.add_argument("--schemes", nargs="+", default=["res"], choices=list(SCHEMES),
                   help="res: residual add + RMSNorm (gpt-oss's MoE input); plain: RMSNorm")
    setup = parse_and_load(p)
    args, dtype, elem, wanted = setup.args, setup.dtype, setup.elem, setup.impls
    have_vllm = "vllm" in wanted

    rows: list[Row] = []
    for scheme in args.schemes:
        residual = SCHEMES[scheme]
        for hidden in args.hidden:
            padded = round_up(hidden, args.multiple)
            impls = make_impls(residual, padded, have_vllm)
            for tokens in args.tokens:
                w = torch.randn(hidden, dtype=dtype, device="cuda")

                def make_set():
                    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
                    r = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
                    return x, r, w

                per_set = tokens * hidden * elem * (2 if residual else 1)
                sets = rotation(make_set, per_set)
                row = Row("rms_norm_pad", f"{scheme}->{padded}", tokens, hidden, args.dtype,
                          minimal_bytes(tokens, hidden, padded, elem, residual))
                rows.append(time_row(row, impls, wanted, sets, args.reps,
                                     f"{scheme} T={tokens} H={hidden}->{padded}"))
                del sets
            torch.cuda.empty_cache()
    finish(rows, wanted, args, "Residual add + RMSNorm + hidden padding")


if __name__ == "__main__":
    main()
