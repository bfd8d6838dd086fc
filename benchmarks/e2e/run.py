#!/usr/bin/env python3
"""End-to-end suite: `vllm bench latency` (and optionally `throughput`) over configurations.

    python benchmarks/e2e/run.py --models llama3-8b-fp8 qwen3-8b --batch-sizes 1 64 \\
        --configs vllm-O2 plugin-O2 --model-root /opt/devpack/models --load-format dummy \\
        --out /tmp/e2e

Each run is its own subprocess, one after the other, with VLLM_DISABLE_COMPILE_CACHE=1. A failed
run is recorded with the tail of its log and the suite goes on. results.json, report.md and
latency.png in --out are rewritten after every run, so a suite cut short still leaves a report.
See README.md next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _load(name: str):
    """plan.py / report.py under a name of their own (a bare ``import plan`` could collide)."""
    full = f"vllm_fusion_e2e_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


plan = _load("plan")
report = _load("report")

DEFAULTS = {
    "models": [], "batch_sizes": [1], "input_len": 32, "output_len": 128, "tp": [1],
    "configs": None, "flags": list(plan.DEFAULT_FLAGS), "iters": 8, "warmup": 3,
    "model_root": os.environ.get("DEVPACK_MODELS", ""), "load_format": None, "tokenizer": None,
    "bench": ["latency"], "num_prompts": 256, "engine_args": [], "custom_configs": {},
    "timeout": None, "time_budget": None, "repeats": 1, "baseline": plan.BASELINE,
}


# ---------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options given on the command line override the plan file; the plan file "
               "overrides the defaults.")
    a = p.add_argument
    a("--plan", help="TOML, YAML or JSON file with any of the options below "
                     "(dashes or underscores)")
    a("--models", nargs="+", help="model names: folders under --model-root, or paths / HF ids")
    a("--batch-sizes", nargs="+", type=int, help="latency batch sizes (default 1)")
    a("--input-len", type=int, help="prompt tokens (default 32)")
    a("--output-len", type=int, help="generated tokens (default 128)")
    a("--tp", nargs="+", type=int, help="tensor-parallel sizes (default 1)")
    a("--configs", nargs="+", help="configurations to run (default: all built-in ones); "
                                   "see --list-configs")
    a("--baseline", help=f"the configuration speedups are computed against (default "
                         f"{plan.BASELINE}); it runs first in each comparison")
    a("--flags", nargs="+", help="PassConfig flags for plugin-only-*/plugin-without-* "
                                 f"(default {' '.join(plan.DEFAULT_FLAGS)})")
    a("--iters", type=int, help="measured iterations (default 8)")
    a("--warmup", type=int, help="warmup iterations (default 3)")
    a("--repeats", type=int,
      help="rounds per comparison, one process per configuration each, in alternating order "
           "(default 1); the report adds the mean over the rounds and its spread")
    a("--model-root", help="folder holding the models (default $DEVPACK_MODELS, else none: "
                           "model names are used as given)")
    a("--load-format", help="vLLM --load-format (default: dummy with a --model-root, i.e. the "
                            "devkit's weightless models; vLLM's own default otherwise)")
    a("--tokenizer", help="tokenizer for every model (default: the model's own)")
    a("--bench", nargs="+", choices=plan.BENCHMARKS, help="benchmarks to run (default latency)")
    a("--num-prompts", type=int, help="bench throughput: prompts (default 256)")
    a("--engine-args", help="extra vLLM engine arguments for every run, one shell-quoted string")
    a("--timeout", type=float, help="seconds before one run is killed and recorded as failed")
    a("--time-budget", type=float,
      help="seconds for the whole suite: a comparison group that would not fit (estimated from the "
           "runs so far) is left for a later --resume")
    a("--resume", action="append", default=[], metavar="DIR",
      help="reuse successful runs with the same fingerprint from DIR/results.json (repeatable)")
    a("--out", help="output folder (default $OUT/e2e when $OUT is set, else e2e-results/<time>)")
    a("--python", default=sys.executable, help="interpreter that runs vLLM (default: this one)")
    a("--git-head", help="revision to record (wins over the .git of a copied checkout, which "
                         "can be stale)")
    a("--log-tail", type=int, default=40, help="log lines kept in the report of a failed run")
    a("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    a("--list-configs", action="store_true", help="print the configurations and exit")
    return p.parse_args(argv)


def merged_options(args: argparse.Namespace) -> dict:
    """Defaults < plan file < command line."""
    opts = dict(DEFAULTS)
    if args.plan:
        path = Path(args.plan)
        opts.update(plan.parse_plan(path.read_text(), path.suffix))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if isinstance(opts["engine_args"], str):
        opts["engine_args"] = shlex.split(opts["engine_args"])
    if opts["configs"] is None:
        opts["configs"] = plan.builtin_names(opts["flags"]) + [
            n for n in opts["custom_configs"] if n not in plan.builtin_names(opts["flags"])]
    if opts["load_format"] is None and opts["model_root"]:
        opts["load_format"] = "dummy"
    return opts


def make_settings(opts: dict):
    return plan.Settings(input_len=opts["input_len"], output_len=opts["output_len"],
                         iters=opts["iters"], warmup=opts["warmup"],
                         load_format=opts["load_format"], model_root=opts["model_root"],
                         tokenizer=opts["tokenizer"], num_prompts=opts["num_prompts"],
                         engine_args=tuple(opts["engine_args"]))


def config_dict(config) -> dict:
    return {"name": config.name, "aliases": list(config.aliases), "env": dict(config.env),
            "args": list(config.args), "description": config.description}


# ---------------------------------------------------------------- environment

PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
spec = importlib.util.find_spec("vllm_fusion")
eps = [f"{e.name} = {e.value}" for e in md.entry_points(group="vllm.general_plugins")
       if e.name == "vllm_fusion"]
out = {"vllm": ver("vllm"), "torch": ver("torch"), "vllm_fusion": ver("vllm-fusion"),
       "vllm_fusion_location": spec.origin if spec else None,
       "plugin_entry_point": ", ".join(eps) or "not installed",
       "python": sys.version.split()[0]}
try:
    import torch
    out["cuda"] = torch.version.cuda or torch.version.hip
    if sys.argv[1:] == ["gpus"] and torch.cuda.is_available():
        out["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name,
                                "memory": f"{p.total_memory >> 20} MiB"})
except Exception as e:
    out["cuda"] = f"torch failed: {e}"
print("E2E-PROBE " + json.dumps(out))
"""


def _output(cmd: Sequence[str], timeout: float = 120) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_smi_gpus() -> tuple[list[dict], str | None]:
    text = _output(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
                    "--format=csv,noheader"], timeout=30)
    gpus, driver = [], None
    for line in (text or "").strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 4:
            gpus.append({"index": int(fields[0]), "name": fields[1], "memory": fields[3]})
            driver = fields[2]
    return gpus, driver


def git_info(override: str | None) -> dict:
    """The revision measured. ``override`` (--git-head) wins: a copied checkout can carry a
    stale .git whose HEAD and changed paths describe some other revision."""
    head = _output(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=30)
    if override:
        info = {"git_head": override}
        if head is not None and not head.strip().startswith(override):
            info["git_tree_head"] = f"{head.strip()} (the .git here; not what ran)"
        return info
    if head is None:
        return {"git_head": "unknown (no git repository here)"}
    status = _output(["git", "-C", str(REPO), "status", "--porcelain"], timeout=30) or ""
    dirty = len([line for line in status.splitlines() if line.strip()])
    return {"git_head": head.strip(), "git_dirty": f"{dirty} paths" if dirty else "none"}


def capture_environment(python: str, git_head: str | None) -> dict:
    gpus, driver = nvidia_smi_gpus()
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "host": platform.node(), "gpus": gpus, "driver": driver}
    probe = _output([python, "-c", PROBE] + ([] if gpus else ["gpus"]), timeout=300) or ""
    for line in probe.splitlines():
        if line.startswith("E2E-PROBE "):
            found = json.loads(line[len("E2E-PROBE "):])
            if not gpus:
                env["gpus"] = found.pop("gpus", [])
            env.update(found)
    if env.get("vllm_fusion") is None:
        version = (REPO / "vllm_fusion" / "version.py")
        if version.exists():
            for line in version.read_text().splitlines():
                if line.startswith("__version__"):
                    value = line.split("=", 1)[1].strip().strip("\"'")
                    env["vllm_fusion"] = f"{value} (source tree)"
    env.update(git_info(git_head))
    env["platform"] = platform.platform()
    env["python_executable"] = python
    return env


# ---------------------------------------------------------------- running

def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm redraws with \r: keep each line's last state
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


# A run past --timeout: SIGABRT first, so that every process of the group prints its Python
# stacks (PYTHONFAULTHANDLER, plan.COMMON_ENV) into the log, then the usual stop.
STACK_DUMP_GRACE_S = 20


def _stop(proc: subprocess.Popen, dump_stacks: bool = False) -> None:
    """End the run's process group (vLLM starts engine-core and worker processes of its own)."""
    steps = ((signal.SIGTERM, 30), (signal.SIGKILL, 10))
    if dump_stacks:
        steps = ((signal.SIGABRT, STACK_DUMP_GRACE_S),) + steps
    for sig, grace in steps:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if _wait_for_group(proc, grace):
            return


def _wait_for_group(proc: subprocess.Popen, grace: float) -> bool:
    """Whether every process of the run's group is gone within ``grace`` seconds (the leader
    can exit before its workers)."""
    deadline = time.monotonic() + grace
    while True:
        proc.poll()  # reaps the leader once it has exited
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _no_core_dumps() -> None:
    """In the run's processes: SIGABRT must not write cores of processes holding GPU memory.
    (Runs between fork and exec, so it imports nothing.)"""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def execute(run, out: Path, python: str, timeout: float | None, log_lines: int,
            invocation: str) -> dict:
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = runs_dir / f"{run.id}.json", runs_dir / f"{run.id}.log"
    json_path.unlink(missing_ok=True)
    command = plan.build_command(run, str(json_path), python)
    record = {**run.describe(), "command": command, "shell": plan.shell_line(run, command),
              "invocation": invocation, "log": str(log_path.relative_to(out)), "result": None}
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(record["shell"] + "\n\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                env=plan.build_env(run, os.environ), start_new_session=True,
                                preexec_fn=_no_core_dumps)
        try:
            rc = proc.wait(timeout)
            error = None if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            _stop(proc, dump_stacks=True)
            rc, error = proc.returncode, (f"killed after the {timeout:.0f} s --timeout (the "
                                          "Python stacks of its processes are in the log)")
        except KeyboardInterrupt:
            _stop(proc)
            record.update(status="failed", returncode=proc.returncode, error="interrupted",
                          duration_s=round(time.monotonic() - start, 1),
                          log_tail=tail(log_path, log_lines))
            raise Interrupted(record) from None
    record.update(returncode=rc, duration_s=round(time.monotonic() - start, 1))
    if error is None and not json_path.exists():
        error = "exited 0 but wrote no --output-json file"
    if error is None:
        try:
            record["result"] = json.loads(json_path.read_text())
        except ValueError as e:
            error = f"unreadable --output-json: {e}"
    record["status"] = "ok" if error is None else "failed"
    if error:
        record.update(error=error, log_tail=tail(log_path, log_lines))
    return record


class Interrupted(Exception):
    def __init__(self, record: dict):
        super().__init__(record["id"])
        self.record = record


def resumable(dirs: Sequence[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Successful records by fingerprint, and the environments that measured them."""
    records, envs = {}, {}
    for d in dirs:
        path = Path(d) / "results.json"
        doc = report.loads(path.read_text())
        for r in doc["records"]:
            if r.get("status") == "ok" and r.get("fingerprint") not in records:
                records[r["fingerprint"]] = {**r, "resumed_from": r.get("resumed_from") or str(d)}
                inv = r.get("invocation")
                envs[inv] = doc.get("environments", {}).get(inv, doc["environment"])
    return records, envs


def complete_groups(runs: Sequence, previous: dict[str, dict]) -> set[str]:
    """Fingerprints worth reusing: only whole comparisons measured in one invocation, so a
    speedup never compares runs of different calls (a partial one is run again whole)."""
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    keep = set()
    for members in groups.values():
        found = [previous.get(r.fingerprint()) for r in members]
        if all(found) and len({f.get("invocation") for f in found}) == 1:
            keep.update(r.fingerprint() for r in members)
    return keep


def skipped(run, reason: str, invocation: str) -> dict:
    return {**run.describe(), "status": "skipped", "error": reason, "invocation": invocation,
            "result": None}


# ---------------------------------------------------------------- outputs

def write_outputs(out: Path, records: list[dict], ctx: dict) -> dict:
    used = {r.get("invocation") for r in records}
    environments = {k: v for k, v in ctx["resumed_envs"].items() if k in used}
    doc = report.build_document(records, command=ctx["command"], environment=ctx["environment"],
                                invocation=ctx["invocation"], settings=ctx["settings"],
                                configs=ctx["configs"], environments=environments,
                                notes=ctx["notes"], baseline=ctx["baseline"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(report.dumps(doc))
    (out / "latency.png").unlink(missing_ok=True)
    chart_note = report.write_chart(doc, str(out / "latency.png"))
    md = report.render_markdown(doc, chart=None if chart_note else "latency.png",
                                chart_note=chart_note or "")
    (out / "report.md").write_text(md)
    return doc


def print_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    rows, baseline = doc["summary"], doc.get("baseline", plan.BASELINE)
    for title, (header, cells) in (("vllm bench latency", report.latency_table(rows, baseline)),
                                   ("vllm bench throughput",
                                    report.throughput_table(rows, baseline))):
        if not cells:
            continue
        table = Table(title=f"{title}: {report.card_name(doc['environment'])}")
        for h in header:
            table.add_column(h, justify="left" if h in ("model", "config", "status") else "right")
        for row in cells:
            style = "bold red" if row[-1].startswith(("failed", "skipped")) else None
            table.add_row(*row, style=style)
        console.print(table)
    for note in report.notes(doc):
        console.print("- " + note, markup=False)


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "e2e"
    return Path("e2e-results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def budget_stop(elapsed: float, durations: Sequence[float], size: int, budget: float | None,
                out: Path) -> str | None:
    """Why the next comparison (``size`` runs) should not start, or None to start it."""
    if not budget or not durations:
        return None
    estimate = sum(durations) / len(durations) * size
    if elapsed + estimate <= budget:
        return None
    return (f"--time-budget {budget:.0f} s: {elapsed:.0f} s used, this comparison needs about "
            f"{estimate:.0f} s; run again with --resume {out}")


def run_suite(runs: Sequence, out: Path, args: argparse.Namespace, opts: dict, ctx: dict,
              previous: dict[str, dict]) -> list[dict] | None:
    """Every run in order (reused, run, or left for later); None when interrupted."""
    records: list[dict] = []
    started, durations = time.monotonic(), []
    stop_reason = None
    group_sizes: dict[tuple, int] = {}
    for run in runs:
        group_sizes[run.group] = group_sizes.get(run.group, 0) + 1
    reusable = complete_groups(runs, previous)
    current_group = None
    invocation = ctx["invocation"]
    for i, run in enumerate(runs, 1):
        if run.fingerprint() in reusable:
            records.append({**previous[run.fingerprint()], "id": run.id,
                            "config": run.config.name, "aliases": list(run.config.aliases)})
            print(f"[{i}/{len(runs)}] {run.id}: reused from {records[-1]['resumed_from']}")
            continue
        if run.group != current_group:
            current_group = run.group
            stop_reason = stop_reason or budget_stop(time.monotonic() - started, durations,
                                                     group_sizes[run.group],
                                                     opts["time_budget"], out)
        if stop_reason:
            records.append(skipped(run, stop_reason, invocation))
            continue
        print(f"[{i}/{len(runs)}] {run.id} ...", end=" ", flush=True)
        try:
            record = execute(run, out, args.python, opts["timeout"], args.log_tail, invocation)
        except Interrupted as e:
            records.append(e.record)
            records += [skipped(r, "interrupted", invocation) for r in runs[i:]]
            write_outputs(out, records, ctx)
            print(f"\ninterrupted; partial report in {out}")
            return None
        durations.append(record["duration_s"])
        records.append(record)
        summary = report.stats(record)
        if not summary:
            value = "FAILED"
        elif record["bench"] == "latency":
            value = f"{summary['avg']:.4f} s"
        else:
            value = f"{summary['tokens_per_second']:.1f} tok/s"
        print(f"{value} ({record['duration_s']:.0f} s)", flush=True)
        write_outputs(out, records, ctx)
    return records


SETTINGS_KEYS = ("models", "batch_sizes", "tp", "input_len", "output_len", "iters", "warmup",
                 "model_root", "load_format", "tokenizer", "engine_args", "bench", "num_prompts",
                 "flags", "timeout", "time_budget", "repeats")


def suite_context(args: argparse.Namespace, opts: dict, configs: Sequence,
                  argv: Sequence[str] | None) -> tuple[dict, dict[str, dict]]:
    """What every write of the outputs shares, and the runs that --resume offers."""
    invocation = (datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
                  + f"-{platform.node()}-{os.getpid()}")
    environment = capture_environment(args.python, args.git_head)
    previous, resumed_envs = resumable(args.resume)
    command = shlex.join(["python", *(sys.argv if argv is None else ["run.py", *argv])])
    ctx = {"command": command, "environment": environment, "invocation": invocation,
           "resumed_envs": resumed_envs, "configs": [config_dict(c) for c in configs],
           "notes": [], "settings": {k: opts[k] for k in SETTINGS_KEYS},
           "baseline": opts["baseline"]}
    if any(c.env.get("VLLM_PLUGINS", "") is None for c in configs):
        entry = environment.get("plugin_entry_point")
        if entry is None:
            ctx["notes"].append(f"Could not check that {args.python} has vllm_fusion installed "
                                "(the environment probe failed).")
        elif "vllm_fusion" not in entry:
            ctx["notes"].append(f"vllm_fusion is not installed as a vllm.general_plugins entry "
                                f"point for {args.python}: the plugin configurations ran plain "
                                "vLLM.")
    return ctx, previous


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts = merged_options(args)
    configs = plan.resolve_configs(opts["configs"], opts["flags"], opts["custom_configs"])
    if args.list_configs:
        for c in configs:
            changes = " ".join(f"{k}=" + ("(unset)" if v is None else v) for k, v in c.env.items())
            print(f"{c.label}\n    {changes} {shlex.join(c.args)}\n    {c.description}")
        return 0
    if not opts["models"]:
        sys.exit("no models: give --models or a plan file with `models`")
    runs = plan.expand_runs(opts["models"], opts["batch_sizes"], opts["tp"], configs,
                            make_settings(opts), opts["bench"], opts["repeats"],
                            opts["baseline"])
    if args.dry_run:
        for i, run in enumerate(runs, 1):
            cmd = plan.build_command(run, f"<out>/runs/{run.id}.json", args.python)
            print(f"# [{i}/{len(runs)}] {run.id}\n{plan.shell_line(run, cmd)}")
        return 0

    out = Path(args.out) if args.out else default_out()
    ctx, previous = suite_context(args, opts, configs, argv)
    environment = ctx["environment"]
    print(f"{len(runs)} runs -> {out}  ({report.card_name(environment)})", flush=True)
    records = run_suite(runs, out, args, opts, ctx, previous)
    if records is None:
        return 130
    doc = write_outputs(out, records, ctx)
    print_tables(doc)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}"
          + ("" if not (out / "latency.png").exists() else f", {out / 'latency.png'}"))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
