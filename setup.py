"""Build script for vllm_fusion: runs CMake to build the kernel library ``vllm_fusion._C``.

Metadata lives in pyproject.toml; this file only adds the compiled extension. The library is
built against torch's stable ABI and Python's limited API, so it is named ``_C.abi3.so`` and one
binary serves every CPython >= 3.10 and the torch releases at or above its ABI floor.

    pip install --no-build-isolation -e .     # editable: the library lands in vllm_fusion/
    pip install .                             # regular wheel / install

Environment variables
---------------------
VLLM_FUSION_TARGET_DEVICE
    ``cuda``, ``rocm`` or ``empty``. ``empty`` builds no extension at all (a pure-Python install:
    every fusion then reports its kernels unavailable). Default: ``rocm`` when the installed torch
    is a ROCm build and hipcc is found, else ``cuda`` when nvcc is found (``$CUDA_HOME/bin``,
    ``PATH``, ``/usr/local/cuda/bin``), else ``empty`` with a message saying so.
VLLM_FUSION_CUDA_ARCHS
    CUDA architectures, ``;``, ``,`` or space separated, e.g. ``9.0a`` or ``8.0;9.0a``. Default
    ``8.0;8.9;9.0a;10.0a``, filtered to those the nvcc in use supports (``nvcc --list-gpu-arch``).
    An ``a`` suffix builds the arch-specific target (``-gencode=arch=compute_90a,code=sm_90a``).
    The list is also exported as ``TORCH_CUDA_ARCH_LIST`` to torch's CMake config (unless that
    is already set), since without a GPU torch would otherwise pick archs nvcc 13 rejects.
PYTORCH_ROCM_ARCH
    ROCm architectures (``gfx942;gfx950`` ...). Default: torch's own arch list, else
    ``gfx90a;gfx942``.
MAX_JOBS
    Parallel compile jobs for Ninja. Default: the number of CPUs.
CMAKE_BUILD_TYPE
    ``Release`` (default), ``RelWithDebInfo`` or ``Debug``.
CUDA_HOME / ROCM_HOME
    Toolkit roots, when not found on ``PATH``.

On a machine where the CUDA toolkit comes from pip (``nvidia/cu13`` inside site-packages) the
build also points torch's CMake config at that package's ``libnvrtc.so.13`` and headers; this is
harmless elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0a;10.0a"
DEFAULT_ROCM_ARCHS = "gfx90a;gfx942"
TARGETS = ("cuda", "rocm", "empty")


def _log(msg: str) -> None:
    print(f"[vllm_fusion] {msg}", flush=True)


def _split_list(value: str) -> list[str]:
    return [v for v in re.split(r"[;,\s]+", value.strip()) if v]


# --------------------------------------------------------------------------- toolkit discovery


def _find_tool(name: str, root_vars: tuple[str, ...], default_root: str) -> str | None:
    """``name`` from $<root var>/bin, PATH, then ``default_root``/bin; None if absent."""
    candidates = [Path(os.environ[v]) / "bin" / name for v in root_vars if os.environ.get(v)]
    which = shutil.which(name)
    if which:
        candidates.append(Path(which))
    candidates.append(Path(default_root) / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _find_nvcc() -> str | None:
    nvcc = _find_tool("nvcc", ("CUDA_HOME", "CUDA_PATH"), "/usr/local/cuda")
    return _real_nvcc(nvcc)[0] if nvcc else None


def _real_nvcc(nvcc: str) -> tuple[str, Path]:
    """(nvcc binary, toolkit root): see through wrapper scripts such as /usr/local/bin/nvcc."""
    path = Path(nvcc).resolve()
    root = path.parent.parent
    if (root / "include" / "cuda_runtime.h").is_file() or (
        root / "targets" / "x86_64-linux" / "include" / "cuda_runtime.h"
    ).is_file():
        return str(path), root
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
        m = re.search(r"^#\$ _HERE_=(.+)$", out, re.MULTILINE)
        if m:
            here = Path(m.group(1).strip()).resolve()
            if (here / "nvcc").is_file():
                return str(here / "nvcc"), here.parent
    except OSError:
        pass
    return str(path), root


def _find_hipcc() -> str | None:
    return _find_tool("hipcc", ("ROCM_HOME", "ROCM_PATH"), "/opt/rocm")


def _torch_is_rocm() -> bool:
    try:
        import torch  # noqa: PLC0415

        return torch.version.hip is not None
    except Exception:  # torch missing or broken: not our call to make here
        return False


def _resolve_target() -> tuple[str, str | None]:
    """(target, compiler path)."""
    requested = os.environ.get("VLLM_FUSION_TARGET_DEVICE", "").strip().lower()
    if requested and requested not in TARGETS:
        raise RuntimeError(
            f"VLLM_FUSION_TARGET_DEVICE={requested!r}: expected one of {', '.join(TARGETS)}"
        )
    if requested == "empty":
        return "empty", None
    if requested == "cuda" or (not requested and not _torch_is_rocm()):
        nvcc = _find_nvcc()
        if nvcc is None:
            if requested == "cuda":
                raise RuntimeError(
                    "VLLM_FUSION_TARGET_DEVICE=cuda but nvcc was not found: set CUDA_HOME "
                    "or put nvcc on PATH"
                )
            _log(
                "no CUDA toolkit found (nvcc not in $CUDA_HOME/bin, PATH or /usr/local/cuda/bin): "
                "building WITHOUT kernels (VLLM_FUSION_TARGET_DEVICE=empty). Set CUDA_HOME to build "
                "them."
            )
            return "empty", None
        return "cuda", nvcc
    hipcc = _find_hipcc()
    if hipcc is None:
        if requested == "rocm":
            raise RuntimeError(
                "VLLM_FUSION_TARGET_DEVICE=rocm but hipcc was not found: set ROCM_HOME"
            )
        _log("ROCm torch but no hipcc found: building WITHOUT kernels (target empty)")
        return "empty", None
    return "rocm", hipcc


def _nvcc_supported_archs(nvcc: str) -> set[str] | None:
    """Numeric compute capabilities nvcc can target, e.g. {"80", "90", "100"}."""
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(re.findall(r"compute_(\d+)", out))


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def _cuda_archs(nvcc: str) -> list[str]:
    requested = _split_list(os.environ.get("VLLM_FUSION_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    for arch in requested:
        if not re.fullmatch(r"\d+\.\d+[af]?", arch):
            raise RuntimeError(
                f"VLLM_FUSION_CUDA_ARCHS entry {arch!r}: expected MAJOR.MINOR with an optional "
                "'a' or 'f' suffix, e.g. 9.0a"
            )
    supported = _nvcc_supported_archs(nvcc)
    if supported is None:
        _log(f"could not run '{nvcc} --list-gpu-arch'; keeping archs as given")
        return requested
    kept, dropped = [], []
    for arch in requested:
        base = arch.rstrip("af").replace(".", "")
        (kept if base in supported else dropped).append(arch)
    if dropped:
        _log(f"nvcc {_nvcc_version(nvcc)} cannot target {', '.join(dropped)}: skipped")
    if not kept:
        raise RuntimeError(
            f"none of VLLM_FUSION_CUDA_ARCHS={';'.join(requested)} is supported by {nvcc} "
            f"(supports compute_{', compute_'.join(sorted(supported, key=int))})"
        )
    return kept


def _rocm_archs() -> list[str]:
    env = os.environ.get("PYTORCH_ROCM_ARCH", "").strip()
    if env:
        return _split_list(env)
    try:
        import torch  # noqa: PLC0415

        archs = [a for a in torch.cuda.get_arch_list() if a.startswith("gfx")]
        if archs:
            return archs
    except Exception:
        pass
    return _split_list(DEFAULT_ROCM_ARCHS)


def _cmake_binary() -> str:
    """A CMake >= 3.26 from the `cmake` Python package if installed, else the one on PATH."""
    try:
        import cmake  # noqa: PLC0415

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.is_file():
            return str(exe)
    except Exception:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("cmake not found: pip install 'cmake>=3.26'")
    return exe


def _pip_cuda_dir() -> Path | None:
    """site-packages/nvidia/cu13 (CUDA 13 from pip wheels), if present."""
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        d = Path(base) / "nvidia" / "cu13"
        if d.is_dir():
            return d
    return None


# --------------------------------------------------------------------------- build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str, compiler: str | None, archs: list[str]):
        super().__init__(name, sources=[], py_limited_api=True)
        self.target = target
        self.compiler = compiler
        self.archs = archs


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "out"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        env = os.environ.copy()
        args = [
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DVLLM_FUSION_TARGET_DEVICE={ext.target}",
            f"-DVLLM_FUSION_GPU_ARCHES={';'.join(ext.archs)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg  # noqa: PLC0415

                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except Exception:
                pass
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")

        if ext.target == "cuda":
            cuda_home = Path(ext.compiler).parent.parent
            args += [
                f"-DCMAKE_CUDA_COMPILER={ext.compiler}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
            ]
            # torch's CMake config reads TORCH_CUDA_ARCH_LIST; with no GPU visible it would
            # otherwise fall back to a list that starts at compute_50, which nvcc 13 rejects.
            env.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(ext.archs))
            pip_cuda = _pip_cuda_dir()
            if pip_cuda is not None:
                nvrtc = pip_cuda / "lib" / "libnvrtc.so.13"
                if nvrtc.is_file():
                    args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
                inc = pip_cuda / "include"
                if inc.is_dir():
                    args += [
                        f"-DVLLM_FUSION_EXTRA_SYSTEM_INCLUDE={inc}",
                    ]
        elif ext.target == "rocm":
            env.setdefault("PYTORCH_ROCM_ARCH", ";".join(ext.archs))
            rocm_home = Path(ext.compiler).parent.parent
            args.append(f"-DROCM_PATH={rocm_home}")

        cmake = _cmake_binary()
        _log(
            f"target={ext.target} archs={';'.join(ext.archs)} compiler={ext.compiler} "
            f"build_type={build_type} jobs={jobs} cmake={cmake}"
        )
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs],
            check=True,
            env=env,
        )

        built = sorted(out_dir.glob("_C*.so"))
        if not built:
            raise RuntimeError(f"CMake finished but no _C*.so was found in {out_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], dest)
        _log(f"built {built[0].name} -> {dest}")


def _extensions() -> tuple[list[Extension], dict]:
    target, compiler = _resolve_target()
    if target == "empty":
        _log("target=empty: no compiled kernels (pure-Python install)")
        return [], {}
    archs = _cuda_archs(compiler) if target == "cuda" else _rocm_archs()
    ext = CMakeExtension("vllm_fusion._C", target, compiler, archs)
    # The library uses only the limited C API: tag wheels abi3.
    return [ext], {"bdist_wheel": {"py_limited_api": "cp310"}}


_ext_modules, _options = _extensions()

setup(
    ext_modules=_ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    options=_options,
)
