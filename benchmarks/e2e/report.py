"""Summaries, speedups, results.json, report.md and latency.png from recorded runs.

Pure functions on plain dicts (what results.json holds), so a report can be rebuilt or tested
without a GPU. A record is a run's ``describe()`` plus:

    status      "ok" | "failed" | "skipped" | "planned" (dry run)
    result      the dict ``vllm bench latency|throughput --output-json`` wrote (ok runs)
    invocation  id of the suite invocation that measured it (speedups never cross invocations)
    command, shell, duration_s, returncode, log, log_tail, error, resumed_from
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence

BASELINE = "vllm-O2"
SCHEMA = 1


# ---------------------------------------------------------------- statistics of one run

def percentile(result: Mapping, p: float) -> float | None:
    """Percentile ``p`` from the JSON's ``percentiles`` (keys "50", 50 or "50.0"), else
    computed from ``latencies`` (linear interpolation, as numpy does)."""
    for key, value in (result.get("percentiles") or {}).items():
        try:
            if float(key) == float(p):
                return float(value)
        except (TypeError, ValueError):
            continue
    values = sorted(float(v) for v in result.get("latencies") or ())
    if not values:
        return None
    pos = (len(values) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def latency_stats(result: Mapping) -> dict:
    lat = [float(v) for v in result.get("latencies") or ()]
    avg = result.get("avg_latency")
    avg = float(avg) if avg is not None else (statistics.fmean(lat) if lat else None)
    stdev = statistics.stdev(lat) if len(lat) > 1 else None
    return {
        "avg": avg,
        "p50": percentile(result, 50),
        "p90": percentile(result, 90),
        "p99": percentile(result, 99),
        "min": min(lat) if lat else None,
        "max": max(lat) if lat else None,
        "stdev": stdev,
        "cv_pct": 100 * stdev / avg if stdev is not None and avg else None,
        "n": len(lat),
    }


def throughput_stats(result: Mapping) -> dict:
    keys = ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second",
            "tokens_per_second")
    return {k: result.get(k) for k in keys}


def stats(record: Mapping) -> dict:
    if record.get("status") != "ok" or not record.get("result"):
        return {}
    if record["bench"] == "throughput":
        return throughput_stats(record["result"])
    return latency_stats(record["result"])


def _score(record: Mapping) -> float | None:
    """The number a speedup compares: latency (lower is better) or tokens/s (higher)."""
    s = stats(record)
    return s.get("tokens_per_second") if record["bench"] == "throughput" else s.get("avg")


def comparison_key(record: Mapping) -> tuple:
    """(bench, model, bs, tp): the comparison a record belongs to, over all its rounds."""
    return (record["bench"], record["model"], record.get("batch_size"), record["tp"])


def group_key(record: Mapping) -> tuple:
    """One round of a comparison: the runs that were timed back to back."""
    return (*comparison_key(record), record.get("repeat", 1))


# ---------------------------------------------------------------- speedups

def speedups(records: Sequence[Mapping], baseline: str = BASELINE) -> dict[str, dict]:
    """Per record id: ``speedup`` over the baseline of the same (bench, model, bs, tp) measured
    in the same invocation (>1 is faster), or None with ``note`` saying why."""
    base = {}
    for r in records:
        if r["config"] == baseline and r.get("status") == "ok":
            base[(group_key(r), r.get("invocation"))] = r
    out = {}
    for r in records:
        if r.get("status") != "ok":
            out[r["id"]] = {"speedup": None, "note": r.get("status", "")}
            continue
        b = base.get((group_key(r), r.get("invocation")))
        if b is None:
            other = [x for x in records if x["config"] == baseline and group_key(x) == group_key(r)]
            if any(x.get("status") == "ok" for x in other):
                note = "baseline measured in another invocation"
            elif other:
                note = f"baseline {baseline} {other[0].get('status', 'missing')}"
            else:
                note = f"baseline {baseline} not run"
            out[r["id"]] = {"speedup": None, "note": note}
            continue
        mine, theirs = _score(r), _score(b)
        if not mine or not theirs:
            out[r["id"]] = {"speedup": None, "note": "no measurement"}
        elif r["bench"] == "throughput":
            out[r["id"]] = {"speedup": mine / theirs, "note": ""}
        else:
            out[r["id"]] = {"speedup": theirs / mine, "note": ""}
    return out


def summary_rows(records: Sequence[Mapping], baseline: str = BASELINE) -> list[dict]:
    """One flat row per record, in record order: what the console and Markdown tables show."""
    ups = speedups(records, baseline)
    rows = []
    for r in records:
        label = " = ".join([r["config"], *r.get("aliases", [])])
        rows.append({"id": r["id"], "bench": r["bench"], "model": r["model"],
                     "batch_size": r.get("batch_size"), "tp": r["tp"], "config": label,
                     "repeat": r.get("repeat", 1),
                     "is_baseline": r["config"] == baseline, "status": r.get("status"),
                     "invocation": r.get("invocation"), **stats(r), **ups[r["id"]]})
    return rows


def round_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per (comparison, configuration) over its rounds (one process each): the average
    latency of every process, their mean, the speedup of the means over the baseline's and
    the range of the per-round speedups. The spread between processes (compile, autotuning,
    memory placement) is usually larger than the spread between iterations of one process."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["bench"] != "latency":
            continue
        entry = out.setdefault((*comparison_key(r), r["config"]), {
            "model": r["model"], "batch_size": r["batch_size"], "tp": r["tp"],
            "config": r["config"], "is_baseline": r["is_baseline"], "avgs": [],
            "round_speedups": []})
        if r["status"] == "ok" and r.get("avg"):
            entry["avgs"].append(r["avg"])
            if r.get("speedup") is not None and not r["is_baseline"]:
                entry["round_speedups"].append(r["speedup"])
    base = {k[:4]: e for k, e in out.items() if e["is_baseline"]}
    for key, e in out.items():
        e["mean"] = statistics.fmean(e["avgs"]) if e["avgs"] else None
        b = base.get(key[:4])
        e["speedup"] = (b["mean"] / e["mean"] if b and e["mean"] and b.get("mean")
                        and not e["is_baseline"] else None)
    return list(out.values())


def has_rounds(rows: Sequence[Mapping]) -> bool:
    return any(r.get("repeat", 1) > 1 for r in rows)


def rounds_table(rows: Sequence[Mapping],
                 baseline: str = BASELINE) -> tuple[list[str], list[list[str]]]:
    header = ["model", "bs", "tp", "config", "processes", "avg of each process (s)",
              "mean (s)", f"speedup of means vs {baseline}", "per-round speedups"]
    cells = []
    for e in round_summary(rows):
        rs = e["round_speedups"]
        cells.append([e["model"], str(e["batch_size"]), str(e["tp"]), e["config"],
                      str(len(e["avgs"])), " ".join(f"{a:.4f}" for a in e["avgs"]),
                      fmt_s(e["mean"]),
                      "baseline" if e["is_baseline"] else
                      (f"{e['speedup']:.3f}x" if e["speedup"] else ""),
                      f"{min(rs):.3f}x-{max(rs):.3f}x" if rs else ""])
    return header, cells


# ---------------------------------------------------------------- formatting helpers

def fmt_s(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fmt_speedup(row: Mapping) -> str:
    if row.get("speedup") is None:
        return ""
    if row.get("is_baseline"):
        return "baseline"
    return f"{row['speedup']:.3f}x"


def spread(row: Mapping) -> str:
    if row.get("min") is None:
        return ""
    sd = f", sd {row['stdev'] * 1e3:.1f} ms" if row.get("stdev") is not None else ""
    return f"{row['min']:.4f}-{row['max']:.4f}{sd}"


def _status(row: Mapping) -> str:
    if row["status"] == "ok" and row.get("note"):
        return f"ok ({row['note']})"
    return str(row["status"])


def latency_table(rows: Sequence[Mapping],
                  baseline: str = BASELINE) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the latency table (shared by the console and the Markdown)."""
    rounds = has_rounds(rows)
    header = ["model", "bs", "tp", *(["round"] if rounds else []), "config", "avg (s)",
              "p50 (s)", "p90 (s)", "min-max (s), stdev", "n", f"speedup vs {baseline}",
              "status"]
    cells = []
    for row in rows:
        if row["bench"] != "latency":
            continue
        round_cell = [str(row.get("repeat", 1))] if rounds else []
        cells.append([row["model"], str(row["batch_size"]), str(row["tp"]), *round_cell,
                      row["config"], fmt_s(row.get("avg")), fmt_s(row.get("p50")), fmt_s(row.get("p90")),
                      spread(row), str(row.get("n") or ""), fmt_speedup(row), _status(row)])
    return header, cells


def throughput_table(rows: Sequence[Mapping],
                     baseline: str = BASELINE) -> tuple[list[str], list[list[str]]]:
    header = ["model", "tp", "config", "tokens/s", "requests/s", "elapsed (s)",
              f"speedup vs {baseline}", "status"]
    cells = []
    for row in rows:
        if row["bench"] != "throughput":
            continue
        cells.append([row["model"], str(row["tp"]), row["config"],
                      fmt_s(row.get("tokens_per_second"), 1),
                      fmt_s(row.get("requests_per_second"), 2), fmt_s(row.get("elapsed_time"), 2),
                      fmt_speedup(row), _status(row)])
    return header, cells


def speedup_matrix(rows: Sequence[Mapping], bench: str = "latency"):
    """Pivot: one line per comparison (model, bs, tp), one column per configuration; with
    several rounds, the speedup of the mean latencies over the rounds."""
    configs = list(dict.fromkeys(r["config"] for r in rows
                                 if r["bench"] == bench and not r["is_baseline"]))
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if r["bench"] != bench:
            continue
        cells = lines.setdefault((r["model"], r["batch_size"], r["tp"]), {})
        if not r["is_baseline"]:
            cells[r["config"]] = fmt_speedup(r) or (r["status"] if r["status"] != "ok" else "")
    if bench == "latency" and has_rounds(rows):
        for e in round_summary(rows):
            if not e["is_baseline"] and e["speedup"]:
                lines[(e["model"], e["batch_size"], e["tp"])][e["config"]] = (
                    f"{e['speedup']:.3f}x ({len(e['avgs'])} processes)")
    with_bs = bench == "latency"
    header = ["model", *(["bs"] if with_bs else []), "tp", *configs]
    body = [[m, *([str(bs)] if with_bs else []), str(tp), *(cells.get(c, "") for c in configs)]
            for (m, bs, tp), cells in lines.items()]
    return header, body


def md_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def card_name(environment: Mapping) -> str:
    gpus = environment.get("gpus") or []
    if not gpus:
        return "no GPU found"
    names = [g.get("name", "?") for g in gpus]
    first = names[0]
    return f"{len(names)}x {first}" if len(names) > 1 and len(set(names)) == 1 else ", ".join(names)


# ---------------------------------------------------------------- results.json

def build_document(records: Sequence[Mapping], *, command: str, environment: Mapping,
                   invocation: str, settings: Mapping, configs: Sequence[Mapping],
                   environments: Mapping[str, Mapping] | None = None, notes: Sequence[str] = (),
                   baseline: str = BASELINE) -> dict:
    """All of a suite in one JSON-ready dict: raw results, summary, environment, command."""
    envs = {invocation: dict(environment), **{k: dict(v) for k, v in (environments or {}).items()}}
    return {
        "schema": SCHEMA,
        "title": f"vllm_fusion end-to-end benchmark: {card_name(environment)}, "
                 f"{str(environment.get('date', ''))[:10]}",
        "command": command,
        "invocation": invocation,
        "baseline": baseline,
        "environment": dict(environment),
        "environments": envs,
        "settings": dict(settings),
        "configs": [dict(c) for c in configs],
        "records": [dict(r) for r in records],
        "summary": summary_rows(records, baseline),
        "notes": list(notes),
    }


def dumps(doc: Mapping) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def loads(text: str) -> dict:
    doc = json.loads(text)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"results schema {doc.get('schema')!r}, expected {SCHEMA}")
    return doc


# ---------------------------------------------------------------- report.md

ENV_FIELDS = (("date", "date"), ("host", "host"), ("gpus", "GPU"), ("driver", "driver"),
              ("cuda", "CUDA (torch)"), ("vllm", "vLLM"), ("torch", "torch"),
              ("vllm_fusion", "vllm_fusion"), ("vllm_fusion_location", "vllm_fusion imported from"),
              ("plugin_entry_point", "vllm.general_plugins entry point"), ("git_head", "git HEAD"),
              ("git_tree_head", "stale .git in the tree"), ("git_dirty", "uncommitted changes"),
              ("python", "Python"), ("platform", "platform"))


def _same_setup(a: Mapping, b: Mapping) -> bool:
    """Same card, driver, software and commit: everything but the date."""
    return {k: v for k, v in a.items() if k != "date"} == {k: v for k, v in b.items()
                                                           if k != "date"}


def environment_table(env: Mapping) -> str:
    cells = []
    for key, label in ENV_FIELDS:
        if key not in env:
            continue
        value = env[key]
        if key == "gpus":
            value = card_name(env) + (f" ({env['gpus'][0].get('memory', '')})" if value else "")
        cells.append([label, "" if value is None else str(value)])
    return md_table(["item", "value"], cells)


def _tail_block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def failures(doc: Mapping) -> list[dict]:
    """Failed runs: id, why, where the log is, and its last lines."""
    out = []
    for r in doc["records"]:
        if r.get("status") == "failed":
            reason = r.get("error") or f"exit status {r.get('returncode')}"
            out.append({"id": r["id"], "reason": reason, "log": r.get("log"),
                        "tail": r.get("log_tail") or "(no output)"})
    return out


def notes(doc: Mapping) -> list[str]:
    """One line each: failures, skipped runs, blank speedups, reused results, merged names."""
    out = list(doc.get("notes", []))
    baseline = doc.get("baseline", BASELINE)
    records = doc["records"]
    for f in failures(doc):
        log = f" (log: `{f['log']}`)" if f["log"] else ""
        out.append(f"{f['id']} FAILED: {f['reason']}{log}; the suite went on.")
    not_run: dict[str, list[str]] = {}
    for r in records:
        if r.get("status") == "skipped":
            not_run.setdefault(r.get("error") or "skipped", []).append(r["id"])
    for reason, ids in not_run.items():
        out.append(f"{len(ids)} run(s) not run ({', '.join(ids)}): {reason}.")
    missing = sorted({row["note"] for row in doc["summary"] if row.get("status") == "ok"
                      and row.get("speedup") is None and row.get("note")})
    for note in missing:
        out.append(f"Speedup left blank where {note}: speedups compare only with the {baseline} "
                   "run of the same model, batch size and TP in the same invocation.")
    resumed = sorted({r["resumed_from"] for r in records if r.get("resumed_from")})
    for source in resumed:
        out.append(f"Some results were reused from `{source}` (same fingerprint); each keeps "
                   "the invocation that measured it.")
    for r in records:
        if r.get("aliases"):
            out.append(f"{r['config']} and {', '.join(r['aliases'])} are the same command: "
                       "one run serves them all.")
    return list(dict.fromkeys(out))


def render_markdown(doc: Mapping, chart: str | None = "latency.png", chart_note: str = "") -> str:
    env = doc["environment"]
    rows = doc["summary"]
    parts = [f"# {doc['title']}", "", "Command:", "", "```", doc["command"], "```", "",
             "## Environment", "", environment_table(env), ""]
    others = {k: v for k, v in doc.get("environments", {}).items() if k != doc["invocation"]}
    for inv, other in others.items():
        if _same_setup(other, env):
            parts += [f"Results reused from invocation `{inv}` ({other.get('date', '')}): "
                      "same card, software and commit as above.", ""]
        else:
            parts += [f"Results reused from invocation `{inv}`:", "", environment_table(other),
                      ""]
    s = doc.get("settings", {})
    if s:
        parts += ["## Settings", "", md_table(["setting", "value"],
                                              [[k, json.dumps(v)] for k, v in s.items()]), ""]
    if doc.get("configs"):
        cfg_cells = [[" = ".join([c["name"], *c.get("aliases", [])]),
                      " ".join(f"{k}=" + ("(unset)" if v is None else v)
                               for k, v in c.get("env", {}).items()),
                      "`" + " ".join(c.get("args", [])) + "`", c.get("description", "")]
                     for c in doc["configs"]]
        parts += ["## Configurations", "",
                  "Every run also sets `VLLM_DISABLE_COMPILE_CACHE=1`, so the passes really run.",
                  "",
                  md_table(["configuration", "environment", "engine args", "what"], cfg_cells), ""]
    baseline = doc.get("baseline", BASELINE)
    header, cells = latency_table(rows, baseline)
    if cells:
        parts += ["## Latency (`vllm bench latency`)", "", md_table(header, cells), ""]
        if has_rounds(rows):
            rh, rc = rounds_table(rows, baseline)
            parts += ["### Over rounds (one process per configuration and round, the order "
                      "alternating between rounds)", "", md_table(rh, rc), ""]
        sh, sb = speedup_matrix(rows, "latency")
        if len(sh) > 3 and any(any(c for c in line[3:]) for line in sb):
            parts += [f"### Speedup over {baseline} "
                      "(same invocation; >1 is faster)", "", md_table(sh, sb), ""]
    header, cells = throughput_table(rows, baseline)
    if cells:
        parts += ["## Throughput (`vllm bench throughput`, random dataset)", "",
                  md_table(header, cells), ""]
        sh, sb = speedup_matrix(rows, "throughput")
        if len(sh) > 2 and any(any(c for c in line[2:]) for line in sb):
            parts += [f"### Throughput speedup over {baseline}", "",
                      md_table(sh, sb), ""]
    if chart:
        parts += ["## Chart", "", f"![average latency per configuration]({chart})", ""]
    elif chart_note:
        parts += ["## Chart", "", chart_note, ""]
    n = notes(doc)
    if n:
        parts += ["## Notes", ""] + [f"- {line}" for line in n] + [""]
    failed = failures(doc)
    if failed:
        parts += ["## Failures", ""]
        for f in failed:
            log = f" Log: `{f['log']}`." if f["log"] else ""
            parts += [f"### {f['id']}", "", f"{f['reason']}.{log} Last lines:", "",
                      _tail_block(f["tail"]), ""]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------- latency.png

def chart_data(rows: Sequence[Mapping]):
    """Groups ("model / bs=N [tp=T]") x configurations -> (avg, min, max, processes) for ok
    latency runs (several rounds: the mean of their averages, the extremes of all iterations),
    or the status (str) for the others, so a failed configuration keeps its place."""
    lat = [r for r in rows if r["bench"] == "latency"]
    show_tp = len({r["tp"] for r in lat}) > 1
    groups: dict[str, dict[str, tuple | str]] = {}
    for r in lat:
        name = f"{r['model']}\nbs={r['batch_size']}" + (f" tp={r['tp']}" if show_tp else "")
        cells = groups.setdefault(name, {})
        if r["status"] == "ok" and r.get("avg"):
            cell = (r["avg"], r.get("min") or r["avg"], r.get("max") or r["avg"], 1)
            previous = cells.get(r["config"])
            if isinstance(previous, tuple):  # another round: mean of the process averages
                avg, mn, mx, n = previous
                cell = ((avg * n + cell[0]) / (n + 1), min(mn, cell[1]), max(mx, cell[2]),
                        n + 1)
            cells[r["config"]] = cell
        elif not isinstance(cells.get(r["config"]), tuple):
            cells[r["config"]] = str(r["status"])
    configs = list(dict.fromkeys(c for g in groups.values() for c in g))
    return groups, configs


def write_chart(doc: Mapping, path: str) -> str | None:
    """Grouped bars of average latency, one group per (model, bs), one bar per configuration
    (whiskers: min..max over the iterations). Returns None when written, else why not."""
    groups, configs = chart_data(doc["summary"])
    if not any(isinstance(c, tuple) for g in groups.values() for c in g.values()):
        return "No successful latency run: no chart."
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed (`pip install matplotlib`, or the `bench` extra): "
                "no chart.")
    width = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + len(groups) * len(configs) * 0.5), 5.0))
    top = max(c[2] for g in groups.values() for c in g.values() if isinstance(c, tuple))
    for i, config in enumerate(configs):
        xs, ys, lo, hi = [], [], [], []
        for g, cells in enumerate(groups.values()):
            x = g - 0.4 + width * (i + 0.5)
            cell = cells.get(config)
            if isinstance(cell, tuple):
                avg, mn, mx, _ = cell
                xs.append(x)
                ys.append(avg)
                lo.append(max(avg - mn, 0.0))
                hi.append(max(mx - avg, 0.0))
            elif cell is not None:
                ax.text(x, top * 0.02, f"{config}: {cell}", rotation=90, ha="center",
                        va="bottom", fontsize=7)
        if xs:
            ax.bar(xs, ys, width, label=config, yerr=[lo, hi], capsize=2, color=f"C{i % 10}")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_ylabel("average latency (s); whiskers: min-max")
    ax.set_title(doc["title"], fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(len(configs), 2), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return None
