"""Benchmark SiLU*Mul+FP8/NVFP4 quant: vllm_fusion's kernels vs Inductor vs vLLM's.

    python benchmarks/kernels/bench_act_quant.py [--tokens ...] [--hidden ...]
        [--schemes static token group128] [--json out.json] [--plot out.png]

``--hidden`` is the output width d (the input is [T, 2d]). Implementations: ``vllm_fusion``
(torch.ops.vllm_fusion.*), ``inductor`` (torch.compile of the torch reference, default mode,
static shapes) and ``vllm`` (vLLM 0.26's torch.ops._C fused kernels where it has one: static
and per-group; it has none for per-token). NVFP4 (``nvfp4``; SM100 only): ``inductor`` is the
unfused graph, Inductor's SiLU*Mul then vLLM's ``scaled_fp4_quant``; ``vllm`` is vLLM's fused
``silu_and_mul_nvfp4_quant``.
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
    parse_and_load,
    rotation,
    time_row,
)

from vllm_fusion import ops as vf  # noqa: E402

# scheme -> group_size (None: static)
NVFP4 = "nvfp4"
NVFP4_GLOBAL_SCALE = 672.0  # 6 * 448 / ~4, as checkpoints calibrate it for such inputs
SCHEMES = {"static": None, "token": 0, "group64": 64, "group128": 128, "nvfp4": NVFP4}
DEFAULT_SCHEMES = ["static", "token", "group128"]


def minimal_bytes(tokens: int, d: int, elem: int, group) -> int:
    b = tokens * 2 * d * elem + tokens * d  # input [T, 2d], fp8 output [T, d]
    if group == NVFP4:  # packed e2m1 output and one e4m3 scale per 16 (no padding counted)
        return b - tokens * d + tokens * d // 2 + tokens * d // 16 + 4
    if group is None:
        b += 4
    elif group == 0:
        b += 4 * tokens
    else:
        b += 4 * tokens * (d // group)
    return b


def make_nvfp4_impls(have_vllm):
    impls = {"vllm_fusion": lambda x, s: torch.ops.vllm_fusion.silu_and_mul_nvfp4_quant(x, s)}
    if have_vllm:
        from vllm._custom_ops import create_fp4_output_tensors, scaled_fp4_quant

        silu_mul = compile_inductor(vf.silu_and_mul_ref)
        impls["inductor"] = lambda x, s: scaled_fp4_quant(silu_mul(x), s)

        def vllm_fused(x, s):
            out, scales = create_fp4_output_tensors(x.shape[0], x.shape[1] // 2, x.device, True)
            torch.ops._C.silu_and_mul_nvfp4_quant(out, scales, x, s)
            return out, scales
        impls["vllm"] = vllm_fused
    return impls


def make_impls(group, fp8, have_vllm):
    if group == NVFP4:
        return make_nvfp4_impls(have_vllm)
    ops = torch.ops.vllm_fusion
    impls = {}
    if group is None:
        impls["vllm_fusion"] = lambda x, s: ops.silu_and_mul_static_fp8_quant(x, s)
        ref = vf.silu_and_mul_static_fp8_quant_ref
        impls["inductor"] = compile_inductor(lambda x, s: ref(x, s))
    else:
        impls["vllm_fusion"] = lambda x, s: ops.silu_and_mul_dynamic_fp8_quant(
            x, group, False, False, None)
        ref = vf.silu_and_mul_dynamic_fp8_quant_ref
        impls["inductor"] = compile_inductor(lambda x, s: ref(x, group, False, False, None))
    if have_vllm and group is None:
        def vllm_static(x, s):
            out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=fp8, device=x.device)
            torch.ops._C.silu_and_mul_quant(out, x, s)
            return out
        impls["vllm"] = vllm_static
    elif have_vllm and group and hasattr(torch.ops._C, "silu_and_mul_per_block_quant"):
        def vllm_group(x, s):
            d = x.shape[1] // 2
            out = torch.empty((x.shape[0], d), dtype=fp8, device=x.device)
            scales = torch.empty((x.shape[0], d // group), dtype=torch.float32,
                                 device=x.device)
            torch.ops._C.silu_and_mul_per_block_quant(out, x, scales, group, None, False)
            return out, scales
        impls["vllm"] = vllm_group
    return impls


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, choices=list(SCHEMES))
    setup = parse_and_load(p)
    args, dtype, elem, wanted = setup.args, setup.dtype, setup.elem, setup.impls
    have_vllm = "vllm" in wanted
    fp8 = vf.fp8_dtype()

    rows: list[Row] = []
    for scheme in args.schemes:
        group = SCHEMES[scheme]
        for d in args.hidden:
            if d % (16 if group == NVFP4 else group or 1):
                continue
            impls = make_impls(group, fp8, have_vllm)
            for tokens in args.tokens:
                s = torch.tensor([NVFP4_GLOBAL_SCALE if group == NVFP4 else 0.02],
                                 device="cuda")

                def make_set():
                    return torch.randn(tokens, 2 * d, dtype=dtype, device="cuda"), s

                sets = rotation(make_set, tokens * 2 * d * elem)
                op = "silu_mul_nvfp4" if group == NVFP4 else "silu_mul_fp8"
                row = Row(op, scheme, tokens, d, args.dtype,
                          minimal_bytes(tokens, d, elem, group))
                rows.append(time_row(row, impls, wanted, sets, args.reps,
                                     f"{scheme} T={tokens} d={d}"))
                del sets
            torch.cuda.empty_cache()
    finish(rows, wanted, args, "SiLU*Mul + FP8 quant")


if __name__ == "__main__":
    main()
