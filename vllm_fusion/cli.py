"""``vllm-fusion``: what the package is and what it would do on this machine.

    vllm-fusion doctor [--json]
    vllm-fusion matrix [--platform ID] [--tp N] [--quant SCHEME] [--level O2] [--no-aiter]
                       [--json|--markdown]
"""

from __future__ import annotations

import argparse
import json
import platform as py_platform
import sys
from importlib.metadata import PackageNotFoundError, version


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none visible"
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    return f"{name} (capability {major}.{minor}, {backend}, {torch.cuda.device_count()} visible)"


def _probe_ops(module: str, *attrs: str) -> str:
    """'present' when ``module`` imports and has every attribute in ``attrs``."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return "not installed"
        mod = importlib.import_module(module)
    except Exception as e:  # a broken install must not break doctor
        return f"import failed ({type(e).__name__}: {e})"
    missing = [a for a in attrs if not hasattr(mod, a)]
    return f"installed, missing {', '.join(missing)}" if missing else "present"


def _nvlink_multicast() -> str:
    """Best effort: torch symmetric memory's multicast support on GPU 0."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.version.hip:
            return "unknown (no CUDA GPU)"
        from torch._C._distributed_c10d import _SymmetricMemory

        return "available" if _SymmetricMemory.has_multicast_support(
            torch._C._autograd.DeviceType.CUDA, 0) else "not available"
    except Exception as e:
        return f"unknown ({type(e).__name__})"


def _machine_setup(level: int = 2, tp: int = 1, quant: str | None = "unquantized"):
    from vllm_fusion import _kernels
    from vllm_fusion.matrix import platform_id, platform_vendor
    from vllm_fusion.resolver import Setup, probe_aiter, probe_aiter_ops, probe_flashinfer

    platform = platform_id()
    return Setup(platform=platform, level=level, tp=tp, quant=quant,
                 has_flashinfer=probe_flashinfer(), has_aiter=probe_aiter(),
                 aiter_ops=probe_aiter_ops() if platform_vendor(platform) == "rocm" else None,
                 kernels_loaded=_kernels.load().loaded)


def _aiter_ops_report() -> str:
    """Which of the AITER ops the matrix's AITER routes call this process has."""
    from vllm_fusion.matrix import load_full_matrix
    from vllm_fusion.resolver import probe_aiter_ops

    wanted = sorted({op for cap in load_full_matrix().fusions.values()
                     for row in cap.rocm.values() for op in row.all_aiter_ops()})
    found = set(probe_aiter_ops())
    if not found:
        return f"none of the {len(wanted)} AITER ops the ROCm routes call (AITER not installed)"
    missing = [op for op in wanted if op not in found]
    return (f"{len(found)}/{len(wanted)} present" +
            (f", missing {', '.join(missing)}" if missing else ""))


def doctor_report() -> dict:
    from vllm_fusion import _kernels
    from vllm_fusion.passes.registry import FUSIONS
    from vllm_fusion.version import SUPPORTED_VLLM, __version__

    from vllm_fusion.resolver import resolve_levels

    kernels = _kernels.load()
    setup = _machine_setup()
    return {
        "vllm_fusion": __version__,
        "python": py_platform.python_version(),
        "vllm": _package_version("vllm"),
        "vllm_supported": list(SUPPORTED_VLLM),
        "torch": _package_version("torch"),
        "flashinfer": _package_version("flashinfer-python"),
        "amd-aiter": _package_version("amd-aiter"),
        "gpu": _gpu(),
        "kernels": {"loaded": kernels.loaded, "detail": kernels.describe(),
                    "path": kernels.path},
        "fusions": {f.flag: _implementation(f) for f in FUSIONS},
        "vllm_api": vllm_api_report(),
        "flashinfer_ops": _probe_ops("flashinfer.comm", "allreduce_fusion",
                                     "create_allreduce_fusion_workspace"),
        "aiter_ops": _aiter_ops_report(),
        "aiter_enabled": _aiter_enabled(),
        "nvlink_multicast": _nvlink_multicast(),
        "platform": setup.platform,
        "levels": {
            f"O{level}": [flag for flag, d in decisions.items() if d.enabled]
            for level, decisions in resolve_levels(setup).items()
        },
        # Who runs each fusion at -O2 here: vllm_fusion, vllm, aiter (vLLM's AITER pass), off.
        "routes_O2": {flag: d.route or "off"
                      for flag, d in resolve_levels(setup, [2])[2].items()},
    }


def _implementation(fusion) -> str:
    from vllm_fusion import compat

    release = compat.release()
    if fusion.package_pass:
        if not release.has_vllm_pass(fusion.flag):  # enable_sp on 0.33: see the resolver
            return (f"vllm_fusion pass (off on vLLM {release.version}: its model runner no "
                    "longer pads token counts for SP)")
        return "vllm_fusion pass"
    if not release.has_vllm_pass(fusion.flag):
        return f"none (vLLM {release.version} has no pass)"
    return "vLLM's pass (not yet replaced)"


def vllm_api_report() -> dict:
    """What the installed vLLM offers the package: the fusion flags its PassConfig has, which
    fusions the package owns or leaves to vLLM, and the settings read from additional_config."""
    from vllm_fusion import compat
    from vllm_fusion.passes.registry import ownership

    try:
        fields = sorted(f for f in compat.pass_config_fields()
                        if f.startswith(("fuse_", "enable_")))
    except Exception as e:  # a broken vLLM install must not break doctor
        fields = [f"unknown ({type(e).__name__}: {e})"]
    release = compat.release()
    return {
        "release": release.version,
        "pass_config_fusion_flags": fields,
        **ownership(release),
        "additional_config_settings": list(release.additional_config_settings),
        "norm_canonicalization": list(release.canonicalization_passes),
    }


def _aiter_enabled() -> str:
    from vllm_fusion.resolver import probe_aiter

    enabled = probe_aiter()
    if enabled is None:
        return "unknown (vLLM's AITER probe failed)"
    return "yes" if enabled else "no (needs ROCm gfx942/gfx950, amd-aiter, VLLM_ROCM_USE_AITER=1)"


def _print_doctor(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"vllm_fusion {report['vllm_fusion']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    supported = report["vllm"] in report["vllm_supported"]
    table.add_row("vLLM", f"{report['vllm']}" + ("" if supported else
                  f"  [red](supported: {', '.join(report['vllm_supported'])})[/red]"))
    for key in ("torch", "python", "flashinfer", "flashinfer_ops", "amd-aiter", "aiter_ops",
                "aiter_enabled", "gpu", "platform", "nvlink_multicast"):
        table.add_row(key, str(report[key]))
    kernel_style = "green" if report["kernels"]["loaded"] else "red"
    table.add_row("kernels", f"[{kernel_style}]{report['kernels']['detail']}[/{kernel_style}]")
    console.print(table)
    _print_vllm_api(console, report["vllm_api"])
    fusions = Table(title="fusions")
    fusions.add_column("PassConfig flag")
    fusions.add_column("implementation")
    for level in report["levels"]:
        fusions.add_column(f"-{level}")
    fusions.add_column("-O2 runs")
    for flag, impl in report["fusions"].items():
        fusions.add_row(flag, impl, *("on" if flag in enabled else "-"
                                      for enabled in report["levels"].values()),
                        report["routes_O2"][flag])
    console.print(fusions)
    console.print("TP=1, unquantized model; `vllm-fusion matrix` shows why (and other setups).")


def _print_vllm_api(console, api: dict) -> None:
    from rich.table import Table

    table = Table(title=f"vLLM {api['release']} API as the package uses it", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    none = "none"
    table.add_row("PassConfig fusion flags", ", ".join(api["pass_config_fusion_flags"]) or none)
    table.add_row("owned by vllm_fusion", ", ".join(api["owned"]) or none)
    table.add_row("delegated to vLLM", ", ".join(api["delegated"]) or none)
    table.add_row("no pass in this vLLM", ", ".join(api["unavailable"]) or none)
    table.add_row("from additional_config", ", ".join(
        f"vllm_fusion.{s}" for s in api["additional_config_settings"]) or
        "none beyond the package's options (SP settings are PassConfig's)")
    table.add_row("norm canonicalization", ", ".join(api["norm_canonicalization"]) or
                  "none (vLLM has no such pass)")
    console.print(table)


def _level(text: str) -> int:
    value = text.upper().removeprefix("-").removeprefix("O")
    if value not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(
            f"invalid level {text!r} (choose from O0, O1, O2, O3)")
    return int(value)


def _tp(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid TP size {text!r} (a positive integer)")
    return value


def _flag(text: str) -> tuple[str, bool]:
    from vllm_fusion.passes.registry import FUSION_FLAGS

    name, _, value = text.partition("=")
    if name not in FUSION_FLAGS or value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(
            f"invalid flag {text!r}: expected FLAG=true|false with FLAG one of "
            f"{', '.join(FUSION_FLAGS)}")
    return name, value.lower() == "true"


def matrix_report(platform: str | None, tp: int, quant: str, levels: list[int],
                  flags: dict[str, bool], pp: int = 1, aiter: bool | None = None) -> dict:
    from vllm_fusion.resolver import resolve_levels, simulated_setup

    if platform is None:
        from dataclasses import replace

        setup = replace(_machine_setup(tp=tp, quant=quant), flags=flags, pp=pp)
        simulated = False
    else:
        extra = {} if aiter is None else {"has_aiter": aiter}
        setup = simulated_setup(platform, tp=tp, quant=quant, flags=flags, pp=pp, **extra)
        simulated = True
    note = None
    if setup.vendor not in ("cuda", "rocm"):
        note = (f"this machine has no supported GPU (platform {setup.platform!r}): nothing is "
                "enabled; simulate one with --platform")
    return {
        "platform": setup.platform,
        "simulated": simulated,
        "note": note,
        "setup": setup.to_dict(),
        "levels": {
            f"O{level}": {flag: d.to_dict() for flag, d in decisions.items()}
            for level, decisions in resolve_levels(setup, levels).items()
        },
    }


_STATUS_STYLE = {"on": "green", "idle": "yellow", "off": "red"}


def _print_matrix(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    setup = report["setup"]
    where = "simulated" if report["simulated"] else "this machine"
    if report["note"]:
        console.print(f"[yellow]{report['note']}[/yellow]")
    for level, decisions in report["levels"].items():
        table = Table(title=f"{setup['platform']} ({where}), TP={setup['tp']}, "
                            f"{setup['quant']}, -{level}", show_lines=False)
        table.add_column("fusion", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("by", no_wrap=True)
        table.add_column("why")
        for flag, d in decisions.items():
            style = _STATUS_STYLE[d["status"]]
            table.add_row(flag, f"[{style}]{d['status']}[/{style}]",
                          d["route"] or d["implementation"], d["reason"])
        console.print(table)
    console.print("on: runs and fuses this scheme; idle: its pass runs but fuses nothing of "
                  "this scheme; off: not run.")


def _emit(report: dict, as_json: bool, print_tables) -> None:
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_tables(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="versions, kernels and fusions on this machine")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of tables")

    from vllm_fusion.resolver import platform_ids, scheme_ids

    matrix = sub.add_parser(
        "matrix", help="which fusion each optimization level enables, and why",
        description="The capability matrix resolved for this machine or a simulated one.")
    matrix.add_argument("--platform", choices=platform_ids(),
                        help="simulate this platform (default: probe this machine)")
    matrix.add_argument("--tp", type=_tp, default=1, help="tensor-parallel size (default 1)")
    matrix.add_argument("--pp", type=_tp, default=1, help="pipeline-parallel size (default 1)")
    matrix.add_argument("--quant", choices=scheme_ids(), default="unquantized",
                        help="quantization scheme of the model (default unquantized)")
    matrix.add_argument("--level", type=_level, action="append",
                        help="O0..O3 (repeatable; default: all four)")
    matrix.add_argument("--set", type=_flag, action="append", default=[], metavar="FLAG=BOOL",
                        help="an explicit -cc.pass_config flag, e.g. fuse_norm_quant=false")
    matrix.add_argument("--no-aiter", dest="aiter", action="store_false", default=None,
                        help="simulate a ROCm machine without AITER (default: AITER installed "
                             "and enabled where vLLM enables it)")
    output = matrix.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of tables")
    output.add_argument("--markdown", action="store_true",
                        help="print docs/matrix.md (the whole matrix, from the data)")
    args = parser.parse_args(argv)

    if args.command == "matrix":
        if args.markdown:
            from vllm_fusion.matrix_doc import render_markdown

            sys.stdout.write(render_markdown())
            return 0
        report = matrix_report(args.platform, args.tp, args.quant,
                               sorted(set(args.level or [0, 1, 2, 3])), dict(args.set),
                               pp=args.pp, aiter=args.aiter)
        _emit(report, args.json, _print_matrix)
        return 0

    if args.command == "doctor":
        _emit(doctor_report(), args.json, _print_doctor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
