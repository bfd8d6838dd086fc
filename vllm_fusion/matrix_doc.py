"""``docs/matrix.md``, generated from ``data/matrix.toml`` and the resolver.

    python -m vllm_fusion.cli matrix --markdown > docs/matrix.md
"""

from __future__ import annotations

from vllm_fusion.compat import VLLM_0_26
from vllm_fusion.matrix import ALL_SCHEMES, RocmRow, load_full_matrix
from vllm_fusion.resolver import LEVELS, resolve_fusion, simulated_setup



def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB"

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yes(value: bool) -> str:
    return "yes" if value else "-"


def _first_level(flag: str, platform: str, tp: int) -> str:
    for level in LEVELS:
        if resolve_fusion(flag, simulated_setup(platform, tp=tp, level=level,
                                                         vllm=VLLM_0_26.version)).enabled:
            return f"O{level}"
    return "-"


def _rocm_cell(row: RocmRow | None) -> str:
    if row is None:
        return "?"
    if row.route != "aiter":
        return row.route
    schemes = "all schemes" if ALL_SCHEMES in row.aiter_ops else ", ".join(row.aiter_ops)
    return f"aiter ({schemes}), else {row.fallback}"


def render_markdown() -> str:
    m = load_full_matrix()
    out: list[str] = []
    add = out.append
    add("# Fusion capability matrix")
    add("")
    add("<!-- Generated from vllm_fusion/data/matrix.toml by "
        "`python -m vllm_fusion.cli matrix --markdown > docs/matrix.md`; do not edit. -->")
    add("")
    add("What each fusion can do, where, and what turns it on. `vllm-fusion matrix` resolves it "
        "for this machine or a simulated one (`--platform sm90 --tp 2 --quant fp8-static "
        "--level O2`). Fusions marked `vllm` are vLLM 0.26's own passes: the package does not "
        "change them, this page only says what vLLM does. vLLM 0.33 removed sequence "
        "parallelism: there `enable_sp` and `fuse_gemm_comms` stay off whatever is set.")
    add("")
    add("## Fusions")
    add("")
    add("| fusion | by | fuses | platforms | default from | full graph | min TP "
        "| FlashInfer (CUDA) | AITER (ROCm) |")
    add("|---|---|---|---|---|---|---|---|---|")
    for flag, cap in m.fusions.items():
        level = f"O{cap.level}" if cap.default_on else "never (explicit only)"
        add(f"| `{flag}` | {cap.implementation} | {_cell(cap.fuses)} | {', '.join(cap.platforms)} "
            f"| {level} | {_yes(cap.needs_full_graph)} | {cap.needs_tp} "
            f"| {_yes(cap.needs_flashinfer)} | {_yes(cap.needs_aiter)} |")
    add("")
    add("## Lowest level that turns each fusion on by default (TP=1 / TP=2)")
    add("")
    add("Unquantized model, vLLM's other defaults, FlashInfer (CUDA) and AITER (ROCm) "
        "installed. `-`: no level does.")
    add("")
    add("| fusion | " + " | ".join(m.platforms) + " |")
    add("|---|" + "---|" * len(m.platforms))
    for flag in m.fusions:
        cells = [f"{_first_level(flag, p, 1)} / {_first_level(flag, p, 2)}" for p in m.platforms]
        add(f"| `{flag}` | " + " | ".join(cells) + " |")
    add("")
    add("## ROCm: what runs on each AMD GPU")
    add("")
    add("`vllm_fusion`: this package's HIP kernel; `aiter`: vLLM 0.26's own AITER pass, to which "
        "the package delegates (vLLM enables AITER on gfx942/gfx950 only, with `amd-aiter` "
        "installed and `VLLM_ROCM_USE_AITER=1`); `vllm`: vLLM's own non-AITER pass; `off`. The "
        "AITER route is taken for the schemes named when AITER has every op it calls; other "
        "schemes, and machines without AITER, take the fallback after `else`. None of this has "
        "run on AMD hardware: see docs/rocm.md.")
    add("")
    rocm = [pid for pid, p in m.platforms.items() if p.vendor == "rocm"]
    add("| fusion | " + " | ".join(rocm) + " |")
    add("|---|" + "---|" * len(rocm))
    for flag, cap in m.fusions.items():
        add(f"| `{flag}` | " + " | ".join(_rocm_cell(cap.rocm.get(p)) for p in rocm) + " |")
    add("")
    add("## Platforms and schemes")
    add("")
    add("| platform | vendor | hardware |")
    add("|---|---|---|")
    for p in m.platforms.values():
        add(f"| `{p.id}` | {p.vendor} | {p.label} |")
    add("")
    add("| scheme | meaning |")
    add("|---|---|")
    for sid, label in m.schemes.items():
        add(f"| `{sid}` | {label} |")
    for flag, cap in m.fusions.items():
        add("")
        add(f"## `{flag}`")
        add("")
        add(f"- implementation: **{cap.implementation}**; fuses: {cap.fuses}")
        add(f"- platforms: {', '.join(cap.platforms)}; elsewhere: {cap.unsupported}")
        add(f"- default: {cap.default}")
        needs = [n for n, on in (("the full graph", cap.needs_full_graph),
                                 (f"TP>={cap.needs_tp}", cap.needs_tp > 1),
                                 ("FlashInfer on CUDA", cap.needs_flashinfer),
                                 ("AITER on ROCm", cap.needs_aiter)) if on]
        if cap.dtypes:
            needs.append(f"model dtype {'/'.join(cap.dtypes)}")
        add(f"- needs: {', '.join(needs) or 'nothing else'}")
        for pid, row in cap.rocm.items():
            ops = "; ".join(f"{k}: {', '.join(v)}" for k, v in row.aiter_ops.items())
            add(f"- ROCm {pid}: **{_rocm_cell(row)}**: {row.reason}"
                + (f" (AITER ops: {ops})" if ops else ""))
        add("")
        add("| scheme | fused | why | fused by default on | measurement |")
        add("|---|---|---|---|---|")
        for sid, v in cap.schemes.items():
            supported = (("all" if v.supported else "no") if isinstance(v.supported, bool)
                         else ", ".join(v.supported))
            default = (", ".join(v.platforms) or "none") if cap.implementation == "vllm_fusion" \
                else "-"
            add(f"| `{sid}` | {supported} | {_cell(v.reason)} | {default} | {_cell(v.measured)} |")
        add("")
        if cap.message_sizes:
            add("| platform | TP | fused messages | one-shot kernel up to | "
                "its push variant up to | measurement |")
            add("|---|---|---|---|---|---|")
            for pid, by_tp in cap.message_sizes.items():
                for tp, sizes in sorted(by_tp.items()):
                    push = _mib(sizes.push_bytes) if sizes.push_bytes else "not used"
                    one_shot = _mib(sizes.one_shot_bytes) if sizes.one_shot_bytes else \
                        "not used (two-shot)"
                    add(f"| `{pid}` | {tp} | {_mib(sizes.min_bytes)} to {_mib(sizes.max_bytes)} | "
                        f"{one_shot} | {push} | {_cell(sizes.measured)} |")
            add("")
            add("Other CUDA platforms and TP sizes: off unless "
                "`pass_config.fi_allreduce_fusion_max_size_mb` is set.")
            add("")
        if cap.sp_thresholds:
            add("| platform | models with hidden >= | from activations per all-reduce | "
                "measurement | cost below the threshold |")
            add("|---|---|---|---|---|")
            for pid, t in cap.sp_thresholds.items():
                add(f"| `{pid}` | {t.min_hidden} | {_mib(t.per_gpu_bytes)} x TP | "
                    f"{_cell(t.measured)} | {_cell(t.decode_cost or 'not measured')} |")
            add("")
            add("`pass_config.sp_min_token_num` replaces the threshold.")
            add("")
        if cap.backends:
            add("| attention backend | takes the fused output | why | measured |")
            add("|---|---|---|---|")
            for name, row in cap.backends.items():
                measured = "; ".join(
                    f"`{pid}`: **{'wins' if m.wins else 'loses'}**: {m.text}"
                    for pid, m in row.measured.items()) or "not measured"
                takes = "yes" if row.writes_fp8_output else "no"
                add(f"| `{name}` | {takes} | {_cell(row.reason)} | {_cell(measured)} |")
            add("")
        if cap.tokens:
            add("| platform | num_tokens | measurement |")
            add("|---|---|---|")
            for pid, r in cap.tokens.items():
                add(f"| `{pid}` | {r.min}-{r.max} | {_cell(r.measured)} |")
        else:
            add("Token range: not measured (runs at every compile range).")
    add("")
    return "\n".join(out)
