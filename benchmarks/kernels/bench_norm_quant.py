"""Benchmark RMSNorm(+residual)+FP8/NVFP4 quant: vllm_fusion's kernels vs Inductor vs vLLM's.

    python benchmarks/kernels/bench_norm_quant.py [--tokens ...] [--hidden ...]
        [--schemes static static_res token_res group128_res] [--json out.json] [--plot out.png]

Implementations: ``vllm_fusion`` (torch.ops.vllm_fusion.*), ``inductor`` (torch.compile of the
torch reference in vllm_fusion.ops, default mode, static shapes) and ``vllm`` (vLLM 0.26's
torch.ops._C fused kernels, when vllm or --vllm-lib is available). NVFP4 (``nvfp4``,
``nvfp4_res``; SM100 only): ``inductor`` is the unfused graph, Inductor's RMSNorm then vLLM's
``scaled_fp4_quant`` kernel; vLLM 0.26 has no fused kernel.
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

EPS = 1e-6
NVFP4 = "nvfp4"
# A global scale as NVFP4 checkpoints calibrate it for randn activations: 6 * 448 / ~4.
NVFP4_GLOBAL_SCALE = 672.0
# scheme -> (group_size or None for static, residual)
SCHEMES = {
    "static": (None, False),
    "static_res": (None, True),
    "token": (0, False),
    "token_res": (0, True),
    "group64": (64, False),
    "group64_res": (64, True),
    "group128": (128, False),
    "group128_res": (128, True),
    "nvfp4": (NVFP4, False),
    "nvfp4_res": (NVFP4, True),
}
DEFAULT_SCHEMES = ["static", "static_res", "token_res", "group128_res"]


def minimal_bytes(tokens: int, hidden: int, elem: int, group, residual: bool) -> int:
    n = tokens * hidden
    b = n * elem + hidden * elem + n  # input, weight, fp8 output
    if residual:
        b += 2 * n * elem  # residual in, residual_out
    if group == NVFP4:  # packed e2m1 output and one e4m3 scale per 16 (no padding counted)
        return b - n + n // 2 + n // 16 + 4
    if group is None:
        b += 4  # static scale
    elif group == 0:
        b += 4 * tokens
    else:
        b += 4 * tokens * (hidden // group)
    return b


def make_nvfp4_impls(residual, have_vllm):
    ops = torch.ops.vllm_fusion
    impls = {}
    if residual:
        impls["vllm_fusion"] = lambda x, r, w, s: ops.fused_add_rms_norm_nvfp4_quant(
            x, r, w, s, EPS)
        norm = compile_inductor(lambda x, r, w: vf.fused_add_rms_norm_ref(x, r, w, EPS))
    else:
        impls["vllm_fusion"] = lambda x, r, w, s: ops.rms_norm_nvfp4_quant(x, w, s, EPS)
        norm = compile_inductor(lambda x, r, w: (vf.rms_norm_ref(x, w, EPS), None))
    if have_vllm:
        from vllm._custom_ops import scaled_fp4_quant

        def unfused(x, r, w, s):
            y, residual_out = norm(x, r, w)
            return (*scaled_fp4_quant(y, s), residual_out)
        impls["inductor"] = unfused
    return impls


def make_impls(group, residual, fp8, have_vllm):
    if group == NVFP4:
        return make_nvfp4_impls(residual, have_vllm)
    ops = torch.ops.vllm_fusion
    impls = {}
    if group is None:
        if residual:
            impls["vllm_fusion"] = lambda x, r, w, s: ops.fused_add_rms_norm_static_fp8_quant(
                x, r, w, s, EPS)
            ref = vf.fused_add_rms_norm_static_fp8_quant_ref
            impls["inductor"] = compile_inductor(lambda x, r, w, s: ref(x, r, w, s, EPS))
        else:
            impls["vllm_fusion"] = lambda x, r, w, s: ops.rms_norm_static_fp8_quant(x, w, s, EPS)
            ref = vf.rms_norm_static_fp8_quant_ref
            impls["inductor"] = compile_inductor(lambda x, r, w, s: ref(x, w, s, EPS))
    else:
        if residual:
            impls["vllm_fusion"] = lambda x, r, w, s: ops.fused_add_rms_norm_dynamic_fp8_quant(
                x, r, w, EPS, group, False, False, None)
            ref = vf.fused_add_rms_norm_dynamic_fp8_quant_ref
            impls["inductor"] = compile_inductor(
                lambda x, r, w, s: ref(x, r, w, EPS, group, False, False, None))
        else:
            impls["vllm_fusion"] = lambda x, r, w, s: ops.rms_norm_dynamic_fp8_quant(
                x, w, EPS, group, False, False, None)
            ref = vf.rms_norm_dynamic_fp8_quant_ref
            impls["inductor"] = compile_inductor(
                lambda x, r, w, s: ref(x, w, EPS, group, False, False, None))
    if have_vllm:
        c = torch.ops._C
        if group is None:
            def vllm_static(x, r, w, s):
                out = torch.empty(x.shape, dtype=fp8, device=x.device)
                if residual:  # residual is updated in place
                    c.fused_add_rms_norm_static_fp8_quant(out, x, r, w, s, EPS)
                else:
                    c.rms_norm_static_fp8_quant(out, x, w, s, EPS)
                return out
            impls["vllm"] = vllm_static
        elif group == 0:
            def vllm_token(x, r, w, s):
                out = torch.empty(x.shape, dtype=fp8, device=x.device)
                scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
                c.rms_norm_dynamic_per_token_quant(out, x, w, scales, EPS, None,
                                                   r if residual else None)
                return out, scales
            impls["vllm"] = vllm_token
        else:
            def vllm_group(x, r, w, s):
                out = torch.empty(x.shape, dtype=fp8, device=x.device)
                scales = torch.empty((x.shape[0], x.shape[1] // group), dtype=torch.float32,
                                     device=x.device)
                c.rms_norm_per_block_quant(out, x, w, scales, EPS, None,
                                           r if residual else None, group, False)
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
        group, residual = SCHEMES[scheme]
        for hidden in args.hidden:
            if hidden % (16 if group == NVFP4 else group or 1):
                continue
            impls = make_impls(group, residual, fp8, have_vllm)
            for tokens in args.tokens:
                w = torch.randn(hidden, dtype=dtype, device="cuda")
                s = torch.tensor([NVFP4_GLOBAL_SCALE if group == NVFP4 else 0.02],
                                 device="cuda")

                def make_set():
                    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
                    r = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
                    return x, r, w, s

                per_set = tokens * hidden * elem * (2 if residual else 1)
                sets = rotation(make_set, per_set)
                op = "rms_norm_nvfp4" if group == NVFP4 else "rms_norm_fp8"
                row = Row(op, scheme, tokens, hidden, args.dtype,
                          minimal_bytes(tokens, hidden, elem, group, residual))
                rows.append(time_row(row, impls, wanted, sets, args.reps,
                                     f"{scheme} T={tokens} H={hidden}"))
                del sets
            torch.cuda.empty_cache()
    finish(rows, wanted, args, "RMSNorm + FP8 quant")


if __name__ == "__main__":
    main()
