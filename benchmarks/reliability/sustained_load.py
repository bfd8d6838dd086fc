#!/usr/bin/env python3
"""Sustained-load test: `vllm serve` with the package's fusions on, against an unfused server.

    python benchmarks/reliability/sustained_load.py --model $DEVPACK_MODELS/qwen3-8b \\
        --duration 120 --concurrency 64 --out /tmp/load

Two servers start on the same dummy weights (``--load-format dummy`` seeds them alike):

* ``fused``: the plugin loaded, every fusion the package implements on
  (``fuse_norm_quant``, ``fuse_act_quant``, ``fuse_rope_kvcache``,
  ``enable_qk_norm_rope_fusion`` and ``force_schemes``, so that each scheme the package has a kernel for is fused);
* ``unfused``: ``VLLM_PLUGINS=`` (set but empty: vLLM loads no plugin), the fusions off.

Both get the same deterministic prompts. First each server answers every prompt once (the
reference), then ``--concurrency`` loopback clients send greedy requests (``temperature 0``,
``ignore_eos``, ``--max-tokens`` tokens) for ``--duration`` seconds. Recorded: HTTP and
connection errors, short answers, error lines in the server logs, latencies; and, per request,
whether its tokens equal the unfused server's reference tokens for the same prompt. By default
both servers share the card, each with ``--gpu-memory-utilization`` of it: they start in turn,
then take load at once (``--no-parallel``: one whole run after the other).

Writes ``sustained_load.json`` and ``sustained_load.md`` (a section for docs/reliability.md)
into ``--out``; exits 1 on any error, or on a token mismatch unless ``--allow-token-mismatch``.
Client: the standard library only (threads and urllib), so it runs in any vLLM environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FUSED_ARGS = (
    "-cc.pass_config.fuse_norm_quant=True -cc.pass_config.fuse_act_quant=True "
    "-cc.pass_config.fuse_rope_kvcache=True -cc.pass_config.enable_qk_norm_rope_fusion=True "
    "--additional-config '{\"vllm_fusion\": {\"force_schemes\": true}}'"
)
UNFUSED_ARGS = (
    "-cc.pass_config.fuse_norm_quant=False -cc.pass_config.fuse_act_quant=False "
    "-cc.pass_config.fuse_rope_kvcache=False -cc.pass_config.enable_qk_norm_rope_fusion=False"
)
# Lines of a server log that mean something went wrong while serving.
ERROR_MARKERS = ("Traceback (most recent call last)", " ERROR ", "CUDA error", "EngineDeadError")



def is_error_line(line: str) -> bool:
    # vLLM prefixes lines of its child processes with "(EngineCore pid=...) ".
    return line.startswith("ERROR ") or any(m in line for m in ERROR_MARKERS)


WORDS = ("the quick brown fox jumps over the lazy dog while seven engineers measure "
         "kernels on a warm afternoon and write down every number they see").split()


def make_prompts(n: int) -> list[str]:
    """Deterministic prompts of varied lengths (5 to 40 words)."""
    prompts = []
    for i in range(n):
        length = 5 + (i * 7) % 36
        words = [WORDS[(i * 3 + k * 5) % len(WORDS)] for k in range(length)]
        prompts.append(f"Request {i}: " + " ".join(words))
    return prompts


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    startup_s: float = 0.0
    # Log size when the load ended: what the shutdown logs afterwards is not judged.
    log_end: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *self.args,
                "--port", str(self.port), "--host", "127.0.0.1"]

    def start(self) -> None:
        self._t0 = time.monotonic()
        log = open(self.log_path, "w")
        # A session of its own: stopping the server stops its engine and workers too.
        self.process = subprocess.Popen(self.command(), env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode} "
                                   f"during startup; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - self._t0
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_findings(self) -> dict:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.log_end is not None:
            text = text[:self.log_end]
        lines = text.splitlines()
        return {
            "error_lines": [l for l in lines if is_error_line(l)][:20],
            "plugin_line": next((l.strip() for l in lines if "vllm_fusion " in l
                                 and "fusions:" in l), None),
            "fusion_warnings": [l.strip() for l in lines if "vllm_fusion:" in l
                                and "WARNING" in l][:20],
        }


def server_env(plugins: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # a cached graph would run no pass
    env["PYTHONUNBUFFERED"] = "1"
    if plugins:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = ""  # set but empty: vLLM loads no plugin
    return env


# ---------------------------------------------------------------- client


@dataclass
class Outcome:
    prompt: int
    ok: bool
    latency_s: float
    tokens: list | None = None
    error: str | None = None


def complete(server: Server, model: str, prompt: str, index: int, max_tokens: int,
             timeout: float) -> Outcome:
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True, "seed": 0,
    }).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        return Outcome(index, False, time.monotonic() - t0, error=f"HTTP {e.code}: {detail}")
    except Exception as e:  # connection reset, timeout, bad JSON: all count as errors
        return Outcome(index, False, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
    latency = time.monotonic() - t0
    choice = payload["choices"][0]
    tokens = choice.get("token_ids") or choice.get("text")
    n = len(choice["token_ids"]) if choice.get("token_ids") is not None else None
    if n is not None and n != max_tokens:
        return Outcome(index, False, latency, tokens, f"{n} tokens instead of {max_tokens}")
    return Outcome(index, True, latency, tokens)


def reference(server: Server, model: str, prompts: list[str], args) -> list[Outcome]:
    """Every prompt once, ``--concurrency`` at a time."""
    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(
            lambda i: complete(server, model, prompts[i], i, args.max_tokens, args.request_timeout),
            range(len(prompts))))


def sustained(server: Server, model: str, prompts: list[str], args) -> tuple[list[Outcome], float]:
    """``--concurrency`` clients, each sending requests back to back for ``--duration`` s."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.duration

    def client(worker: int) -> None:
        k = 0
        while time.monotonic() < deadline:
            index = (worker + k * args.concurrency) % len(prompts)
            outcome = complete(server, model, prompts[index], index, args.max_tokens,
                               args.request_timeout)
            with lock:
                outcomes.append(outcome)
            k += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.monotonic() - t0


# ---------------------------------------------------------------- summary


@dataclass
class ServerResult:
    name: str
    command: str
    startup_s: float
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    # Requests whose tokens differ from the unfused server's reference for their prompt.
    mismatches_vs_unfused_reference: int | None = None
    # ... and from this server's own reference (batch-dependent rounding shows here).
    mismatches_vs_own_reference: int = 0
    mismatch_samples: list[dict] = field(default_factory=list)
    log: dict = field(default_factory=dict)


def mismatches(outcomes: list[Outcome], ref: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.ok and ref[o.prompt].ok and o.tokens != ref[o.prompt].tokens]


def summarize(server: Server, load: list[Outcome], wall: float, own_ref: list[Outcome],
              unfused_ref: list[Outcome] | None) -> ServerResult:
    bad = [o for o in load + own_ref if not o.ok]
    latencies = sorted(o.latency_s for o in load if o.ok)
    result = ServerResult(server.name, shlex.join(server.command()), round(server.startup_s, 1))
    result.requests = len(load)
    result.errors = len(bad)
    result.error_samples = sorted({o.error for o in bad})[:10]
    result.wall_s = round(wall, 1)
    result.requests_per_s = round(len(load) / wall, 2) if wall else 0.0
    if latencies:
        result.latency_p50_s = round(statistics.median(latencies), 3)
        result.latency_p99_s = round(latencies[min(len(latencies) - 1,
                                                   int(0.99 * len(latencies)))], 3)
    result.mismatches_vs_own_reference = len(mismatches(load, own_ref))
    if unfused_ref is not None:
        differing = mismatches(load + own_ref, unfused_ref)
        result.mismatches_vs_unfused_reference = len(differing)
        result.mismatch_samples = [
            {"prompt": o.prompt, "got": o.tokens, "unfused": unfused_ref[o.prompt].tokens}
            for o in differing[:3]
        ]
    result.log = server.log_findings()
    return result


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict[str, str]:
    code = ("import json, vllm, torch, vllm_fusion; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'vllm_fusion': vllm_fusion.__version__}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300).stdout.strip().splitlines()
        return json.loads(out[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return {}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"### Sustained load, {report['date']}, {report['card']}",
        "",
        f"`{report['command']}` (commit {report['commit'] or 'unknown'}; "
        f"vLLM {report['versions'].get('vllm', '?')}, torch {report['versions'].get('torch', '?')}, "
        f"vllm_fusion {report['versions'].get('vllm_fusion', '?')}). Model `{a['model']}` with "
        f"dummy weights, {a['concurrency']} concurrent greedy requests of {a['max_tokens']} tokens "
        f"for {a['duration']} s per server, {a['prompts']} distinct prompts"
        f"{', both servers on one card at once' if a['parallel'] else ''}.",
        "",
        "| server | startup s | requests | errors | req/s | p50 s | p99 s | tokens differ from "
        "unfused reference | differ from own reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["servers"]:
        vs_unfused = r["mismatches_vs_unfused_reference"]
        lines.append(
            f"| {r['name']} | {r['startup_s']} | {r['requests']} | {r['errors']} | "
            f"{r['requests_per_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} | "
            f"{'-' if vs_unfused is None else vs_unfused} | {r['mismatches_vs_own_reference']} |")
    lines += ["", f"Verdict: **{report['verdict']}**."]
    for r in report["servers"]:
        if r["log"].get("plugin_line"):
            lines += ["", f"{r['name']} server's plugin line: `{r['log']['plugin_line']}`"]
        for sample in r["error_samples"][:3]:
            lines += ["", f"{r['name']} error: `{sample}`"]
        for line in r["log"].get("error_lines", [])[:3]:
            lines += ["", f"{r['name']} log: `{line.strip()}`"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (config.json; dummy weights)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load per server")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=64, help="distinct prompts")
    p.add_argument("--port", type=int, default=8431, help="fused server; unfused gets port+1")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.42,
                   help="per server with --parallel (two servers share the card)")
    p.add_argument("--no-parallel", dest="parallel", action="store_false",
                   help="one server at a time (each gets 0.9 of the card)")
    p.add_argument("--common-args", default="-O2 --max-model-len 1024 --seed 0",
                   help="vllm serve arguments of both servers")
    p.add_argument("--fused-args", default=FUSED_ARGS)
    p.add_argument("--unfused-args", default=UNFUSED_ARGS)
    p.add_argument("--startup-timeout", type=float, default=420.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--allow-token-mismatch", action="store_true",
                   help="report token differences without failing (e.g. FP8 models)")
    p.add_argument("--out", type=Path, default=Path("."))
    return p.parse_args(argv)


def make_servers(args) -> tuple[Server, Server]:
    tokenizer = args.tokenizer or args.model
    memory = args.gpu_memory_utilization if args.parallel else 0.9
    base = [args.model, "--tokenizer", tokenizer, "--load-format", "dummy",
            "--served-model-name", "model", "--gpu-memory-utilization", str(memory),
            *shlex.split(args.common_args)]
    fused = Server("fused", args.port, base + shlex.split(args.fused_args), server_env(True),
                   args.out / "server-fused.log")
    unfused = Server("unfused", args.port + 1, base + shlex.split(args.unfused_args),
                     server_env(False), args.out / "server-unfused.log")
    return fused, unfused


def run(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.prompts)
    fused, unfused = make_servers(args)
    results: dict[str, tuple] = {}
    failures: dict[str, str] = {}
    order = [unfused, fused]

    def exercise(server: Server) -> None:
        """Reference pass, then sustained load."""
        try:
            ref = reference(server, "model", prompts, args)
            load, wall = sustained(server, "model", prompts, args)
            results[server.name] = (ref, load, wall)
            server.log_end = len(server.log_path.read_text(errors="replace"))
        except Exception as e:
            failures[server.name] = f"{type(e).__name__}: {e}"

    def start(server: Server) -> bool:
        server.start()
        try:
            server.wait_ready(args.startup_timeout)
            return True
        except Exception as e:
            failures[server.name] = f"{type(e).__name__}: {e}"
            return False

    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        if args.parallel:
            # Started one after the other: vLLM sizes its KV cache from the memory it sees
            # while profiling, which the other server's startup would disturb. Then both
            # take load at once.
            ready = [s for s in order if start(s)]
            threads = [threading.Thread(target=exercise, args=(s,)) for s in ready]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for server in order:
                if start(server):
                    exercise(server)
                server.stop()
    finally:
        for server in order:
            server.stop()

    unfused_ref = results["unfused"][0] if "unfused" in results else None
    servers = []
    for server in order:
        if server.name not in results:
            continue
        ref, load, wall = results[server.name]
        servers.append(asdict(summarize(server, load, wall, ref,
                                        unfused_ref if server is fused else None)))
    errors = sum(s["errors"] + len(s["log"]["error_lines"]) for s in servers)
    mismatched = sum(s["mismatches_vs_unfused_reference"] or 0 for s in servers)
    ok = not failures and len(servers) == 2 and errors == 0 and (
        mismatched == 0 or args.allow_token_mismatch)
    verdict = "pass" if ok else "FAIL"
    if failures:
        verdict += " (" + "; ".join(f"{k}: {v}" for k, v in failures.items()) + ")"
    report = {
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": started.isoformat(timespec="seconds"),
        "card": gpu_name(),
        "commit": git_commit(),
        "versions": versions(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "servers": servers,
        "failures": failures,
        "ok": ok,
        "verdict": verdict,
    }
    (args.out / "sustained_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "sustained_load.md").write_text(markdown(report))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
