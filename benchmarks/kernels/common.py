"""Shared pieces of the kernel micro-benchmarks: timing, byte accounting, baselines, reports.

Timing: each implementation runs over several input sets in rotation (enough of them that
their total size is a few times the L2 cache, so inputs come from HBM), captured as one CUDA
graph of many calls; the graph is replayed and the median replay time divided by the number of
calls is the time per call. Bandwidth counts the minimal bytes: every input read once, every
output written once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Vendor HBM peaks, bytes/s, by device-name substring (first match wins).
HBM_PEAKS = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100", 2.039e12),
    ("L40S", 0.864e12),
    ("MI300X", 5.3e12),
    ("MI325X", 6.0e12),
)

TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
HIDDEN = (4096, 8192)


@dataclass
class Row:
    op: str
    scheme: str
    tokens: int
    hidden: int
    dtype: str
    bytes: int
    us: dict[str, float] = field(default_factory=dict)  # implementation -> us per call

    def gbps(self, impl: str) -> float | None:
        t = self.us.get(impl)
        return None if t is None else self.bytes / (t * 1e-6) / 1e9


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN),
                   help="hidden size (for SiLU*Mul: the output width d; the input is 2d)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--impls", nargs="+", default=["vllm_fusion", "inductor", "vllm"],
                   help="implementations to time (vllm: vLLM's own fused kernels, if loadable)")
    p.add_argument("--vllm-lib", default=None,
                   help="path of vLLM's _C_stable_libtorch.abi3.so to load when vllm itself "
                   "is not importable")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak in GB/s for the %%-of-peak column (default: from device name)")
    p.add_argument("--reps", type=int, default=25, help="graph replays per measurement")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    return p


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def require_kernels() -> None:
    """Exit with the reason when this package's compiled ops are not loadable."""
    from vllm_fusion import _kernels  # noqa: PLC0415

    status = _kernels.load()
    if not status.loaded:
        sys.exit(f"vllm_fusion kernels unavailable: {status.reason}")


@dataclass
class Setup:
    """What a kernel benchmark's ``main`` starts from."""

    args: argparse.Namespace
    dtype: torch.dtype
    elem: int  # bytes per element of dtype
    impls: list[str]  # the requested implementations that can run here


def parse_and_load(p: argparse.ArgumentParser) -> Setup:
    """Parse the command line, require this package's kernels and load vLLM's where the
    ``vllm`` implementation is asked for (dropped, with a note, where they are missing)."""
    args = p.parse_args()
    require_kernels()
    dtype = torch_dtype(args.dtype)
    have_vllm = "vllm" in args.impls and load_vllm_ops(args.vllm_lib)
    impls = [i for i in args.impls if i != "vllm" or have_vllm]
    return Setup(args, dtype, torch.finfo(dtype).bits // 8, impls)


def peak_bytes_per_s(peak_gbps: float | None) -> float | None:
    if peak_gbps:
        return peak_gbps * 1e9
    name = torch.cuda.get_device_name()
    for key, peak in HBM_PEAKS:
        if key in name:
            return peak
    return None


# ----------------------------------------------------------------------------- baselines


def load_vllm_ops(lib: str | None) -> bool:
    """Make vLLM's torch.ops._C kernels available: import vllm._custom_ops, or load the
    library file given. Returns whether they are there."""
    try:
        import vllm._custom_ops  # noqa: F401, PLC0415

        return hasattr(torch.ops._C, "rms_norm_static_fp8_quant")
    except Exception:
        pass
    if lib:
        try:
            torch.ops.load_library(lib)
        except Exception as e:  # noqa: BLE001
            print(f"# could not load {lib}: {e}", file=sys.stderr)
            return False
    try:
        return hasattr(torch.ops._C, "rms_norm_static_fp8_quant")
    except Exception:
        return False


def compile_inductor(fn: Callable) -> Callable:
    """torch.compile (Inductor, default mode, static shapes) of a reference."""
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 1024)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- timing


def rotation(make_set: Callable[[], tuple], bytes_per_set: int, l2_multiple: float = 4.0,
             max_sets: int = 64) -> list[tuple]:
    """Input sets whose total size is >= l2_multiple x L2 (at least 2, at most max_sets)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    n = max(2, min(max_sets, math.ceil(l2_multiple * l2 / max(bytes_per_set, 1))))
    return [make_set() for _ in range(n)]


def time_per_call(fn: Callable, arg_sets: Sequence[tuple], reps: int = 25,
                  min_calls: int = 16) -> float:
    """Median microseconds per call of fn over rotating arg sets, replayed as a CUDA graph
    (falls back to timing a plain loop if capture fails)."""
    k = len(arg_sets)
    calls = max(min_calls, k)
    for i in range(min(k, 3)):  # warm-up: compilation, autotuning, allocator
        fn(*arg_sets[i])
    torch.cuda.synchronize()

    def loop():
        for i in range(calls):
            fn(*arg_sets[i % k])

    run = loop
    graph = None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loop()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        graph.replay()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print(f"# graph capture failed ({type(e).__name__}: {e}); timing a plain loop",
              file=sys.stderr)
        graph = None
    torch.cuda.synchronize()
    run()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


# ----------------------------------------------------------------------------- reporting


def time_row(row: "Row", impls: dict[str, Callable], wanted: Sequence[str],
             arg_sets: Sequence[tuple], reps: int, label: str) -> "Row":
    """Time every wanted implementation on the same input sets into ``row.us``; one that
    fails is reported and left out, so the others still get measured."""
    for name in wanted:
        if name in impls:
            try:
                row.us[name] = time_per_call(impls[name], arg_sets, reps=reps)
            except Exception as e:  # noqa: BLE001
                print(f"# {name} {label} failed: {e}", file=sys.stderr)
    print(f"# {label}: " + ", ".join(f"{k} {v:.2f}us" for k, v in row.us.items()), flush=True)
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(rows: list[Row], impls: list[str], args: argparse.Namespace, title: str) -> None:
    peak = peak_bytes_per_s(args.peak_gbps)
    ours = impls[0]
    headers = ["op", "scheme", "T", "H"]
    for impl in impls:
        headers += [f"{impl} us"]
    headers += [f"{ours} GB/s", "% peak"]
    for impl in impls[1:]:
        headers += [f"vs {impl}"]
    table = []
    for r in rows:
        line = [r.op, r.scheme, str(r.tokens), str(r.hidden)]
        line += [_fmt(r.us.get(i), ".2f") for i in impls]
        g = r.gbps(ours)
        line += [_fmt(g, ".0f"), _fmt(None if g is None or peak is None else 100 * g * 1e9 / peak,
                                      ".1f")]
        for impl in impls[1:]:
            a, b = r.us.get(ours), r.us.get(impl)
            line += [_fmt(None if a is None or b is None else b / a, ".2f") + "x"]
        table.append(line)

    device = torch.cuda.get_device_name()
    print(f"\n{title} on {device} (peak {_fmt(peak and peak / 1e9, '.0f')} GB/s); "
          f"'vs X' = X time / {ours} time")
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        t = Table(show_lines=False)
        for h in headers:
            t.add_column(h, justify="right")
        for line in table:
            t.add_row(*line)
        Console(width=max(160, 12 * len(headers))).print(t)
        return
    except ImportError:
        pass
    try:
        from tabulate import tabulate  # noqa: PLC0415

        print(tabulate(table, headers=headers, stralign="right"))
        return
    except ImportError:
        pass
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for line in table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def write_json(path: str, rows: list[Row], args: argparse.Namespace, title: str) -> None:
    peak = peak_bytes_per_s(args.peak_gbps)
    doc = {
        "benchmark": title,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "peak_bytes_per_s": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "rows": [
            {**asdict(r), "gbps": {i: r.gbps(i) for i in r.us}} for r in rows
        ],
    }
    Path(path).write_text(json.dumps(doc, indent=2))
    print(f"# wrote {path}")


def plot(path: str, rows: list[Row], impls: list[str], title: str) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("# matplotlib not installed: no plot", file=sys.stderr)
        return
    keys = sorted({(r.op, r.scheme) for r in rows})
    hiddens = sorted({r.hidden for r in rows})
    fig, axes = plt.subplots(len(keys), len(hiddens), figsize=(5 * len(hiddens), 3.2 * len(keys)),
                             squeeze=False)
    for (op, scheme), ax_row in zip(keys, axes):
        for hidden, ax in zip(hiddens, ax_row):
            sel = sorted((r for r in rows if (r.op, r.scheme, r.hidden) == (op, scheme, hidden)),
                         key=lambda r: r.tokens)
            for impl in impls:
                pts = [(r.tokens, r.gbps(impl)) for r in sel if r.gbps(impl) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {scheme} H={hidden}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("GB/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title} on {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# wrote {path}")


def finish(rows: list[Row], impls: list[str], args: argparse.Namespace, title: str) -> None:
    present = [i for i in impls if any(i in r.us for r in rows)]
    report(rows, present, args, title)
    if args.json:
        write_json(args.json, rows, args, title)
    if args.plot:
        plot(args.plot, rows, present, title)
