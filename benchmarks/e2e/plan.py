"""What an end-to-end suite runs: the named configurations, the matrix of runs, their commands.

Pure functions only (no subprocess, no vLLM import), so the planning can be tested on a CPU.

A configuration is a set of environment variables plus extra engine arguments. An environment
value of ``None`` means "remove the variable", which is how the plugin configurations make sure
that an inherited ``VLLM_PLUGINS`` cannot switch the plugin off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

BASELINE = "vllm-O2"
DEFAULT_FLAGS = ("fuse_norm_quant", "fuse_act_quant")
BENCHMARKS = ("latency", "throughput")
CLI_MODULE = "vllm.entrypoints.cli.main"

# vLLM's own custom-op fusions, exactly as vLLM's documentation spells them.
VLLM_FUSIONS_COMPILATION_CONFIG = {
    "custom_ops": ["+rms_norm", "+quant_fp8", "+silu_and_mul"],
    "pass_config": {"fuse_norm_quant": True, "fuse_act_quant": True},
}

# Set for every run: a cached graph would run no pass at all. Inductor's own caches stay on:
# without them an 8B model compiles for 160 s instead of about 10 (H100, 2026-11-27), and an
# identical graph then gets identical kernels. Unbuffered output keeps the log of a failed
# run in order (stdout and stderr go to one file). The fault handler prints every thread's Python
# stack when a process dies of a signal: a run that hangs is stopped with SIGABRT first, so its
# log shows where each process (API, engine core, every worker) was waiting.
COMMON_ENV = {"VLLM_DISABLE_COMPILE_CACHE": "1", "PYTHONUNBUFFERED": "1",
              "PYTHONFAULTHANDLER": "1"}

_PLAIN_VLLM = {"VLLM_PLUGINS": ""}  # set but empty: vLLM loads no plugin
_WITH_PLUGIN = {"VLLM_PLUGINS": None}  # unset: vLLM loads every installed plugin


@dataclass(frozen=True)
class Config:
    """One named configuration. ``aliases``: other requested names planned to the same run."""

    name: str
    env: Mapping[str, str | None]
    args: tuple[str, ...]
    description: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " = ".join((self.name, *self.aliases))

    def identity(self) -> str:
        """What makes two configurations the same run (the name does not)."""
        return json.dumps({"env": dict(sorted(self.env.items())), "args": list(self.args)})


def compilation_config_arg(config: Mapping) -> tuple[str, str]:
    return ("--compilation-config", json.dumps(config, separators=(", ", ": ")))


def pass_config_args(enabled: Mapping[str, bool]) -> tuple[str, ...]:
    return ("-O2", *compilation_config_arg({"pass_config": dict(enabled)}))


def builtin_config(name: str, flags: Sequence[str] = DEFAULT_FLAGS) -> Config:
    """The configuration called ``name``; ``plugin-only-X``/``plugin-without-X`` accept any flag."""
    if name == BASELINE:
        return Config(name, dict(_PLAIN_VLLM), ("-O2",), "plain vLLM, its -O2 defaults (baseline)")
    if name == "vllm-fusions":
        return Config(name, dict(_PLAIN_VLLM),
                      ("-O2", *compilation_config_arg(VLLM_FUSIONS_COMPILATION_CONFIG)),
                      "plain vLLM, custom ops on, vLLM's own norm/act+quant fusions")
    if name == "plugin-O2":
        return Config(name, dict(_WITH_PLUGIN), ("-O2",),
                      "vllm_fusion loaded, -O2 (its autoconfig)")
    for prefix, on_alone in (("plugin-only-", True), ("plugin-without-", False)):
        if name.startswith(prefix) and len(name) > len(prefix):
            flag = name[len(prefix):]
            all_flags = list(dict.fromkeys([*flags, flag]))
            enabled = {f: (f == flag) == on_alone for f in all_flags}
            what = "only" if on_alone else "all but"
            return Config(name, dict(_WITH_PLUGIN), pass_config_args(enabled),
                          f"vllm_fusion loaded, -O2, {what} {flag} of {', '.join(all_flags)}")
    raise ValueError(f"unknown configuration {name!r}; known: {', '.join(builtin_names(flags))}, "
                     "or plugin-only-<flag> / plugin-without-<flag> for any PassConfig flag")


def builtin_names(flags: Sequence[str] = DEFAULT_FLAGS) -> list[str]:
    return [BASELINE, "vllm-fusions", "plugin-O2",
            *(f"plugin-only-{f}" for f in flags), *(f"plugin-without-{f}" for f in flags)]


def custom_config(name: str, spec: Mapping) -> Config:
    """A configuration defined in a plan file: ``env`` (table), ``unset_env`` (list), ``args``."""
    unknown = set(spec) - {"env", "unset_env", "args", "description"}
    if unknown:
        raise ValueError(f"configuration {name!r}: unknown keys {sorted(unknown)}")
    env: dict[str, str | None] = {k: str(v) for k, v in dict(spec.get("env", {})).items()}
    env.update({k: None for k in spec.get("unset_env", [])})
    args = spec.get("args", [])
    args = tuple(shlex.split(args) if isinstance(args, str) else (str(a) for a in args))
    return Config(name, env, args, str(spec.get("description", "defined in the plan file")))


def resolve_configs(names: Iterable[str], flags: Sequence[str] = DEFAULT_FLAGS,
                    custom: Mapping[str, Mapping] | None = None) -> list[Config]:
    """The configurations asked for, in order; names planned to an identical run are merged."""
    custom = custom or {}
    configs = [custom_config(n, custom[n]) if n in custom else builtin_config(n, flags)
               for n in dict.fromkeys(names)]
    return merge_identical(configs)


def merge_identical(configs: Sequence[Config]) -> list[Config]:
    """Fold configurations that would run the same command into the first one (as aliases).

    With two flags, plugin-only-A is exactly plugin-without-B: one run serves both names.
    """
    merged: dict[str, Config] = {}
    for config in configs:
        key = config.identity()
        if key in merged:
            first = merged[key]
            merged[key] = Config(first.name, first.env, first.args, first.description,
                                 (*first.aliases, config.name, *config.aliases))
        else:
            merged[key] = config
    return list(merged.values())


@dataclass(frozen=True)
class Settings:
    """What every run of a suite shares."""

    input_len: int = 32
    output_len: int = 128
    iters: int = 8
    warmup: int = 3
    load_format: str | None = None  # None: vLLM's default
    model_root: str = ""
    tokenizer: str | None = None  # None: the model's own
    num_prompts: int = 256  # bench throughput only
    engine_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    bench: str  # "latency" or "throughput"
    model: str  # as named on the command line (the label in reports)
    batch_size: int | None  # None for throughput (it schedules num_prompts itself)
    tp: int
    config: Config
    settings: Settings = field(default_factory=Settings)
    repeat: int = 1  # which process of this (comparison, configuration), from 1

    @property
    def model_path(self) -> str:
        return resolve_model(self.model, self.settings.model_root)

    @property
    def group(self) -> tuple:
        """Runs that are compared with each other (one per configuration): one round."""
        return (self.bench, self.model, self.batch_size, self.tp, self.repeat)

    @property
    def id(self) -> str:
        model = self.model.strip("/").replace("/", "_")
        if self.batch_size is not None:
            bs = f"bs{self.batch_size}"
        else:
            bs = f"n{self.settings.num_prompts}"
        name = f"{self.bench}__{model}__{bs}__tp{self.tp}__{self.config.name}"
        return name if self.repeat == 1 else f"{name}__r{self.repeat}"

    def fingerprint(self) -> str:
        """Everything that decides the measurement; equal fingerprints may reuse a result."""
        s = self.settings
        key = [self.bench, self.model_path, self.batch_size, self.tp, s.input_len, s.output_len,
               s.iters, s.warmup, s.load_format, s.tokenizer, list(s.engine_args),
               s.num_prompts if self.bench == "throughput" else None, self.config.identity(),
               sorted(COMMON_ENV.items())]
        if self.repeat != 1:
            key.append(self.repeat)
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """The run as a JSON-ready dict: the start of its record in results.json."""
        return {"id": self.id, "bench": self.bench, "model": self.model,
                "model_path": self.model_path, "batch_size": self.batch_size, "tp": self.tp,
                "config": self.config.name, "aliases": list(self.config.aliases),
                "repeat": self.repeat, "fingerprint": self.fingerprint(), "env": env_changes(self)}


def resolve_model(name: str, root: str) -> str:
    """``root/name`` for a devkit-style folder of models; ``name`` alone without a root or for
    an absolute path (a real checkpoint folder or a Hugging Face id with ``--model-root ''``)."""
    if not root or os.path.isabs(name):
        return name
    return os.path.join(root, name)


def expand_runs(models: Sequence[str], batch_sizes: Sequence[int], tps: Sequence[int],
                configs: Sequence[Config], settings: Settings,
                benches: Sequence[str] = ("latency",), repeats: int = 1,
                baseline: str = BASELINE) -> list[Run]:
    """The matrix, ordered so the configurations of one comparison run back to back
    (baseline first when it is asked for), latency before throughput. With ``repeats`` > 1
    each comparison runs that many rounds in alternating order (A B, B A, ...), so a drift of
    the card over time (clocks, temperature) does not favour one configuration."""
    unknown = set(benches) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ordered = sorted(configs, key=lambda c: c.name != baseline)
    runs = []
    for bench in (b for b in BENCHMARKS if b in benches):
        sizes: Sequence[int | None] = batch_sizes if bench == "latency" else (None,)
        for model in models:
            for tp in tps:
                for bs in sizes:
                    for r in range(1, repeats + 1):
                        round_order = ordered if r % 2 else ordered[::-1]
                        runs.extend(Run(bench, model, bs, tp, c, settings, r)
                                    for c in round_order)
    return runs


def build_command(run: Run, output_json: str, python: str = "python") -> list[str]:
    s = run.settings
    cmd = [python, "-m", CLI_MODULE, "bench", run.bench, "--model", run.model_path]
    if s.tokenizer:
        cmd += ["--tokenizer", s.tokenizer]
    if s.load_format:
        cmd += ["--load-format", s.load_format]
    if run.bench == "latency":
        cmd += ["--batch-size", str(run.batch_size), "--input-len", str(s.input_len),
                "--output-len", str(s.output_len), "--num-iters-warmup", str(s.warmup),
                "--num-iters", str(s.iters)]
    else:
        cmd += ["--dataset-name", "random", "--input-len", str(s.input_len),
                "--output-len", str(s.output_len), "--num-prompts", str(s.num_prompts)]
    cmd += ["--tensor-parallel-size", str(run.tp), "--output-json", output_json]
    return cmd + list(run.config.args) + list(s.engine_args)


def env_changes(run: Run) -> dict[str, str | None]:
    """The variables a run sets (str) or removes (None) on top of the inherited environment."""
    return {**COMMON_ENV, **run.config.env}


def build_env(run: Run, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    for key, value in env_changes(run).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def shell_line(run: Run, command: Sequence[str]) -> str:
    """The run as one line a shell can execute: ``env -u VAR A=1 python -m ...``."""
    changes = env_changes(run)
    unset = [f"-u {shlex.quote(k)}" for k, v in changes.items() if v is None]
    assigned = [f"{k}={shlex.quote(v)}" for k, v in changes.items() if v is not None]
    prefix = " ".join((["env", *unset] if unset else []) + assigned)
    return f"{prefix} {shlex.join(command)}".strip()


PLAN_KEYS = {"models", "batch_sizes", "input_len", "output_len", "tp", "configs", "iters",
             "warmup", "model_root", "load_format", "tokenizer", "flags", "bench", "num_prompts",
             "engine_args", "custom_configs", "timeout", "time_budget", "repeats", "baseline"}


def parse_plan(text: str, suffix: str) -> dict:
    """A plan file's content (TOML, YAML or JSON by suffix) with keys checked and normalised
    (``batch-sizes`` and ``batch_sizes`` both work)."""
    suffix = suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"plan file must end in .toml, .yaml, .yml or .json, not {suffix!r}")
    if not isinstance(data, dict):
        raise ValueError("a plan file holds one table/mapping at the top level")
    plan = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise ValueError(f"unknown plan keys {sorted(unknown)}; known: {sorted(PLAN_KEYS)}")
    for key in ("models", "batch_sizes", "tp", "configs", "flags", "bench", "engine_args"):
        if key in plan and isinstance(plan[key], (str, int)):
            plan[key] = shlex.split(plan[key]) if key == "engine_args" else [plan[key]]
    return plan
