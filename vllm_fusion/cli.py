"""``vllm-fusion``: what the package is and what it would do on this machine.

    vllm-fusion doctor [--json]
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


def doctor_report() -> dict:
    from vllm_fusion import _kernels
    from vllm_fusion.passes.registry import FUSIONS
    from vllm_fusion.version import SUPPORTED_VLLM, __version__

    kernels = _kernels.load()
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
        "fusions": {
            f.flag: "vllm_fusion pass" if f.package_pass else "vLLM's pass (not yet replaced)"
            for f in FUSIONS
        },
    }


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
    for key in ("torch", "python", "flashinfer", "amd-aiter", "gpu"):
        table.add_row(key, str(report[key]))
    kernel_style = "green" if report["kernels"]["loaded"] else "red"
    table.add_row("kernels", f"[{kernel_style}]{report['kernels']['detail']}[/{kernel_style}]")
    console.print(table)
    fusions = Table(title="fusions")
    fusions.add_column("PassConfig flag")
    fusions.add_column("implementation")
    for flag, impl in report["fusions"].items():
        fusions.add_row(flag, impl)
    console.print(fusions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="versions, kernels and fusions on this machine")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        report = doctor_report()
        if args.json:
            json.dump(report, sys.stdout, indent=2)
            print()
        else:
            _print_doctor(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
