"""Copy csrc/ into the build tree and hipify it there with torch's hipify.

    python cmake/hipify.py --src <repo>/csrc --dst <build>/csrc

Every file under --src is copied to --dst and translated CUDA -> HIP in place; hipify's
renamed outputs (``x_hip.h``) replace their originals, includes are pointed back at the
original names, and each ``.cu`` file is renamed ``.hip`` so that CMake compiles it as HIP.
csrc/compat.h keeps the few spots where the two differ behind ``#ifdef USE_ROCM``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from torch.utils.hipify.hipify_python import hipify


def _hipified_path(result) -> str | None:
    path = getattr(result, "hipified_path", None)
    if path is None and isinstance(result, dict):
        path = result.get("hipified_path")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", required=True, type=Path)
    parser.add_argument("--dst", required=True, type=Path)
    args = parser.parse_args()
    src, dst = args.src.resolve(), args.dst.resolve()

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    originals = sorted(p for p in dst.rglob("*") if p.is_file())

    results = hipify(
        project_directory=str(dst),
        output_directory=str(dst),
        header_include_dirs=[str(dst)],
        includes=[str(dst / "*")],
        extra_files=[str(p) for p in originals],
        show_detailed=False,
        show_progress=False,
        is_pytorch_extension=True,
        hipify_extra_files_only=True,
    )

    # A translated copy written under another name replaces the original file.
    for original, result in results.items():
        hip_path = _hipified_path(result)
        if hip_path and Path(hip_path).resolve() != Path(original).resolve() and os.path.isfile(
            hip_path
        ):
            os.replace(hip_path, original)

    # hipify points includes at the renamed headers ("common_hip.cuh"): use the original names.
    names = {p.name for p in originals}
    pattern = re.compile(r'#include\s+"([^"]+?)_hip(\.[A-Za-z]+)"')

    def fix(match: re.Match) -> str:
        name = f"{match.group(1)}{match.group(2)}"
        return f'#include "{name}"' if name in names else match.group(0)

    for p in originals:
        text = p.read_text()
        fixed = pattern.sub(fix, text)
        if fixed != text:
            p.write_text(fixed)

    for cu in dst.rglob("*.cu"):
        cu.rename(cu.with_suffix(".hip"))


if __name__ == "__main__":
    main()
