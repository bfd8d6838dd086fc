"""Micro-benchmark: all-reduce + residual add + RMSNorm, fused vs unfused, on 2 or 4 GPUs.

    python benchmarks/kernels/bench_allreduce.py --world 2 --json ar_tp2.json --plot ar_tp2.png

Implementations (each rank runs the same; the reported time is the slowest rank's):
  fused-1shot / fused-2shot  this package's kernel (vllm_fusion::all_reduce_rms_norm)
  fused-push                 its one-shot with push=True: every rank writes its rows into all
                             ranks' buffers and sums locally (messages up to max / world)
  vllm+inductor              vLLM's all-reduce as vLLM picks it for the message (custom
                             all-reduce, NCCL or symmetric memory; needs vLLM) + the RMSNorm
                             compiled by Inductor, as vLLM -O2 runs it unfused
  nccl+inductor              torch.distributed NCCL all-reduce + the same compiled RMSNorm

Each implementation is captured as one CUDA graph of --calls calls and replayed --reps times;
time per call = median replay / calls. Message size = tokens x hidden x 2 bytes (bf16).

The report ends with the matrix row these numbers give (``suggest_sizes``): the message sizes
where the best fused kernel is at least as fast as the best unfused path at every hidden size,
and where one-shot and its push variant take over. ``--update-matrix sm90`` writes that row into
``[fusions.fuse_allreduce_rms.message_sizes.sm90]`` of vllm_fusion/data/matrix.toml (a
``measured`` text already there stays, for a person to rewrite).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS = {4096: (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
          8192: (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)}
EPS = 1e-6
MiB = 2**20


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 8 KiB to 64 MiB messages per hidden size)")
    p.add_argument("--impls", nargs="+",
                   default=["fused-1shot", "fused-push", "fused-2shot", "vllm+inductor",
                            "nccl+inductor"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-mib", type=float, default=64.0, help="largest message")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--update-matrix", metavar="PLATFORM", default=None,
                   help="write the suggested tp<world> row into the matrix for PLATFORM "
                        "(e.g. sm90)")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Groups:
    """The TP group: vLLM's when vLLM is importable (its all-reduce is a baseline), else torch's."""

    def __init__(self, rank, world, port):
        self.vllm = None
        try:
            from vllm.config import VllmConfig, set_current_vllm_config
            from vllm.distributed import parallel_state as ps

            with set_current_vllm_config(VllmConfig()):
                ps.init_distributed_environment(world, rank, f"tcp://127.0.0.1:{port}", rank,
                                                "nccl")
                ps.initialize_model_parallel(tensor_model_parallel_size=world)
            self.vllm = ps
            tp = ps.get_tp_group()
            self.device_group, self.cpu_group = tp.device_group, tp.cpu_group
        except ImportError:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world)
            self.device_group = dist.group.WORLD
            self.cpu_group = dist.new_group(backend="gloo")

    def graph_context(self, device):
        if self.vllm is not None:
            return self.vllm.graph_capture(device)
        return None


def _norm_fn():
    """The RMSNorm as Inductor compiles vLLM's native fused_add_rms_norm (one kernel)."""
    from vllm_fusion.ops.norm_quant import fused_add_rms_norm_ref

    # One compiled graph per shape: never fall back to eager after the default recompile limit.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    return torch.compile(fused_add_rms_norm_ref, dynamic=False)


def _time_graph(fn, calls, reps, groups, device) -> float:
    """us per call of fn() captured `calls` times in one graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    ctx = groups.graph_context(device)
    if ctx is not None:
        with ctx as gc, torch.cuda.graph(graph, stream=gc.stream):
            for _ in range(calls):
                fn()
    else:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier(group=groups.cpu_group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.cpu_group)
    return float(t.item())


def _impl(name, ws, groups, x, residual, weight, norm):
    ops = torch.ops.vllm_fusion
    if name.startswith("fused"):
        two_shot, push = name == "fused-2shot", name == "fused-push"
        if push and not ws.fits_push(x):
            return None
        return lambda: ops.all_reduce_rms_norm(x, residual, weight, EPS, None, ws.buffers,
                                               ws.counter, ws.rank, ws.capacity, two_shot, push)
    if name == "vllm+inductor":
        if groups.vllm is None:
            return None
        tp = groups.vllm.get_tp_group()
        return lambda: norm(tp.all_reduce(x), residual, weight, EPS)

    def nccl():
        y = x.clone()
        dist.all_reduce(y, group=groups.device_group)
        return norm(y, residual, weight, EPS)

    return nccl


def _worker(rank, world, port, args, results):
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    groups = _Groups(rank, world, port)
    importlib.import_module("vllm_fusion.ops")  # loads the kernels
    from vllm_fusion.ops import allreduce_workspace

    capacity = int(args.max_mib * MiB)
    ws = allreduce_workspace.get_workspace("bench", groups.device_group, capacity, device,
                                           groups.cpu_group)
    norm = _norm_fn()
    rows = []
    for hidden in args.hidden:
        weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
        for tokens in args.tokens or TOKENS.get(hidden, TOKENS[4096]):
            nbytes = tokens * hidden * 2
            if nbytes > capacity:
                continue
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            residual = torch.randn_like(x)
            row = {"tokens": tokens, "hidden": hidden, "mib": nbytes / MiB, "us": {}}
            for name in args.impls:
                fn = _impl(name, ws, groups, x, residual, weight, norm)
                if fn is not None:
                    row["us"][name] = _time_graph(fn, args.calls, args.reps, groups, device)
            rows.append(row)
            if rank == 0:
                cells = "  ".join(f"{k} {v:8.2f}" for k, v in row["us"].items())
                print(f"hidden {hidden:5d} tokens {tokens:5d} {row['mib']:8.3f} MiB  {cells}",
                      flush=True)
    if rank == 0:
        results.extend(rows)
    allreduce_workspace.release_workspaces()
    dist.barrier(group=groups.cpu_group)


ONE_SHOT = ("fused-1shot", "fused-push")
FUSED = (*ONE_SHOT, "fused-2shot")
UNFUSED = ("vllm+inductor", "nccl+inductor")


def _best(us: dict, names) -> float | None:
    return min((us[n] for n in names if n in us), default=None)


def _sizes_where(rows, predicate) -> dict[float, bool]:
    """Message size (MiB) -> whether ``predicate(us)`` holds at every hidden size measured there
    (None from the predicate: not measured, ignored)."""
    verdict: dict[float, bool] = {}
    for r in rows:
        ok = predicate(r["us"])
        if ok is not None:
            verdict[r["mib"]] = verdict.get(r["mib"], True) and ok
    return dict(sorted(verdict.items()))


def _longest_run(verdict: dict[float, bool]) -> list[float]:
    """The longest run of consecutive sizes that hold (ties: the run of larger sizes)."""
    best, run = [], []
    for mib, ok in verdict.items():
        run = run + [mib] if ok else []
        if len(run) >= len(best):
            best = run
    return best


def _prefix_holding(sizes: list[float], verdict: dict[float, bool]) -> float:
    """The largest size up to which ``verdict`` holds for every size of ``sizes`` (0: none)."""
    last = 0.0
    for mib in sizes:
        if not verdict.get(mib, False):
            break
        last = mib
    return last


def suggest_sizes(rows) -> dict[str, float] | None:
    """The matrix row ``{min_mib, max_mib, one_shot_mib, push_mib}`` the measurements give, or
    None where the fused kernel wins nowhere.

    Fused range: the longest run of measured sizes where the best fused kernel is at least as
    fast as the best unfused path at every hidden size; it starts at 0 when the run starts at
    the smallest size measured. One-shot (the better of pull and push) is taken up to the
    largest size from which down it beats two-shot everywhere, push likewise against pull."""
    def fused_wins(us):
        fused, unfused = _best(us, FUSED), _best(us, UNFUSED)
        return None if fused is None or unfused is None else fused <= unfused

    wins = _sizes_where(rows, fused_wins)
    window = _longest_run(wins)
    if not window:
        return None

    def one_shot_wins(us):
        one, two = _best(us, ONE_SHOT), us.get("fused-2shot")
        return None if one is None else (two is None or one <= two)

    def push_wins(us):
        push, pull = us.get("fused-push"), us.get("fused-1shot")
        return None if push is None else (pull is None or push <= pull)

    one_shot = _prefix_holding(window, _sizes_where(rows, one_shot_wins))
    push = _prefix_holding(window, _sizes_where(rows, push_wins))
    smallest = next(iter(wins))
    return {"min_mib": 0.0 if window[0] == smallest else window[0], "max_mib": window[-1],
            "one_shot_mib": one_shot, "push_mib": min(push, one_shot)}


def matrix_row_text(world: int, sizes: dict[str, float]) -> str:
    cells = ", ".join(f"{k} = {v:g}" for k, v in sizes.items())
    return f"tp{world} = {{ {cells} }}"


def update_matrix(text: str, platform: str, row: str) -> str:
    """``text`` (matrix.toml) with ``row`` (``tp<N> = {...}``) in the all-reduce message-size
    table of ``platform``: replacing that TP size's row, else added as the table's first line."""
    header = f"[fusions.fuse_allreduce_rms.message_sizes.{platform}]"
    start = text.find(header + "\n")
    if start < 0:
        raise SystemExit(f"--update-matrix: no {header} table in the matrix; add it by hand")
    body = start + len(header) + 1
    end = text.find("\n[", body)
    end = len(text) if end < 0 else end + 1
    key = row.split(" ", 1)[0]
    table = text[body:end]
    line = re.compile(rf"^{key}\s*=.*$", re.MULTILINE)
    old = line.search(table)
    if old is None:
        return text[:body] + row + "\n" + table + text[end:]
    # The row's own measured text is the person's to rewrite; it is kept meanwhile.
    measured = re.search(r'measured\s*=\s*"(?:[^"\\]|\\.)*"', old.group(0))
    if measured:
        row = row[:-2] + ", " + measured.group(0) + " }"
    return text[:body] + table[:old.start()] + row + table[old.end():] + text[end:]


def _report(rows, args, path_json, path_plot):
    device = torch.cuda.get_device_name(0)
    meta = {"date": datetime.date.today().isoformat(), "device": device, "world": args.world,
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        meta["vllm"] = None
    if path_json:
        Path(path_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        from tabulate import tabulate
    except ImportError:
        tabulate = None
    impls = [i for i in args.impls if any(i in r["us"] for r in rows)]
    table = []
    for r in rows:
        best_unfused, fused = _best(r["us"], UNFUSED), _best(r["us"], FUSED)
        speedup = best_unfused / fused if best_unfused and fused else None
        table.append([r["hidden"], r["tokens"], f"{r['mib']:.3f}",
                      *[f"{r['us'][i]:.2f}" if i in r["us"] else "-" for i in impls],
                      f"{speedup:.2f}x" if speedup else "-"])
    headers = ["hidden", "tokens", "MiB", *[f"{i} us" for i in impls], "best fused vs best unfused"]
    print(f"\n{device} x{args.world}, {meta['date']}, torch {meta['torch']}, vLLM {meta['vllm']}")
    if tabulate:
        print(tabulate(table, headers=headers, tablefmt="github"))
    else:
        print(headers)
        for t in table:
            print(t)
    sizes = suggest_sizes(rows)
    row = matrix_row_text(args.world, sizes) if sizes else None
    print(f"\nmatrix row from these numbers: {row or 'none (the fused kernel wins at no size)'}")
    if sizes and sizes["max_mib"] == max(r["mib"] for r in rows):
        print("  max_mib is the largest message measured: the fused kernel may win above it too")
    if args.update_matrix and row:
        from vllm_fusion.data import __file__ as data_init

        path = Path(data_init).with_name("matrix.toml")
        path.write_text(update_matrix(path.read_text(), args.update_matrix, row))
        print(f"written to {path} [{args.update_matrix}]")
    if path_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.hidden), figsize=(6 * len(args.hidden), 4.5))
        axes = axes if len(args.hidden) > 1 else [axes]
        for ax, hidden in zip(axes, args.hidden):
            sel = [r for r in rows if r["hidden"] == hidden]
            for impl in impls:
                pts = [(r["mib"], r["us"][impl]) for r in sel if impl in r["us"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("message (MiB)")
            ax.set_ylabel("us per call")
            ax.set_title(f"hidden {hidden}, TP{args.world}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"all-reduce + add + RMSNorm, {device}, {meta['date']}")
        fig.tight_layout()
        fig.savefig(path_plot, dpi=120)


def main(argv=None):
    args = _args(argv)
    if torch.cuda.device_count() < args.world:
        sys.exit(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
    manager = mp.Manager()
    results = manager.list()
    mp.spawn(_worker, args=(args.world, _free_port(), args, results), nprocs=args.world,
             join=True)
    _report(list(results), args, args.json, args.plot)


if __name__ == "__main__":
    main()
