"""Make vLLM's CUDA code paths load on a machine with no GPU.

Two things are faked, nothing else:
- ``libcuda.so.1``: vLLM's compiled ops link against it. ``LIBCUDA_STUB`` points
  at a generated stand-in (``.ci/make_libcuda_stub.sh``) whose every entry point
  returns CUDA_ERROR_STUB_LIBRARY, so the ``torch.ops._C.*`` schemas load but no
  kernel can run.
- ``vllm.platforms.current_platform``: a CUDA platform whose compute capability
  the tests choose, so platform gates and pattern registration behave as on that GPU.

Graphs are traced on fake CUDA tensors, so no kernel is ever called.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STUB_ENV = "LIBCUDA_STUB"
STUB_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "make_libcuda_stub.sh"


def _build_stub() -> str:
    out = Path(tempfile.gettempdir()) / f"vllm_fusion_cuda_stub_{os.getuid()}"
    library = out / "libcuda.so.1"
    if not library.exists():
        subprocess.run(
            ["bash", str(STUB_SCRIPT), str(out)],
            env={**os.environ, "PYTHON": sys.executable},
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return str(library)


def load_libcuda() -> str:
    """Make ``libcuda.so.1`` loadable: $LIBCUDA_STUB, the real driver, or a
    stub generated on the spot. Returns what was loaded."""
    path = os.environ.get(STUB_ENV)
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{STUB_ENV}={path} does not exist; build it with .ci/make_libcuda_stub.sh DIR"
            )
    else:
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
            return "libcuda.so.1"
        except OSError:
            path = _build_stub()
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    # Subprocesses started by tests find the same library.
    os.environ[STUB_ENV] = path
    return path


def install_fake_cuda_platform(capability: tuple[int, int] = (9, 0)):
    """Force vLLM's current platform to a CUDA GPU of ``capability``."""
    import vllm.platforms as platforms
    from vllm.platforms.cuda import CudaPlatformBase
    from vllm.platforms.interface import DeviceCapability

    class FakeCudaPlatform(CudaPlatformBase):
        """A CUDA platform with a chosen capability and no device behind it."""

        capability_override = DeviceCapability(*capability)

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return cls.capability_override

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            major, minor = cls.capability_override
            return f"Simulated NVIDIA GPU sm_{major}{minor}"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 80 * 1024**3

        @classmethod
        def is_fully_connected(cls, device_ids: list[int]) -> bool:
            return True

        @classmethod
        def device_count(cls) -> int:
            return 1

    platform = FakeCudaPlatform()
    platforms.current_platform = platform
    return platform


@contextlib.contextmanager
def simulated_capability(major: int, minor: int):
    """Temporarily change the simulated GPU's compute capability."""
    import vllm.platforms as platforms
    from vllm.platforms.interface import DeviceCapability

    cls = type(platforms.current_platform)
    saved = cls.capability_override
    cls.capability_override = DeviceCapability(major, minor)
    try:
        yield
    finally:
        cls.capability_override = saved


# ---------------------------------------------------------------- ROCm

_ROCM_ARCH = {"arch": "gfx942"}


def _install_fake_amdsmi() -> None:
    """An ``amdsmi`` that reports one AMD GPU of the simulated arch: vLLM's ROCm platform
    module reads the GCN arch from it when it is imported (and on reload)."""
    import types

    if getattr(sys.modules.get("amdsmi"), "__vllm_fusion_fake__", False):
        return
    amdsmi = types.ModuleType("amdsmi")
    amdsmi.__vllm_fusion_fake__ = True

    class AmdSmiException(Exception):
        pass

    class AmdSmiMemoryType:
        VRAM = 0

    def asic_info(handle):
        arch = _ROCM_ARCH["arch"]
        return {"target_graphics_version": arch, "device_id": "", "market_name": f"Simulated {arch}"}

    amdsmi.AmdSmiException = AmdSmiException
    amdsmi.AmdSmiMemoryType = AmdSmiMemoryType
    amdsmi.amdsmi_init = lambda *args: None
    amdsmi.amdsmi_shut_down = lambda *args: None
    amdsmi.amdsmi_get_processor_handles = lambda: [0]
    amdsmi.amdsmi_get_gpu_asic_info = asic_info
    amdsmi.amdsmi_get_gpu_device_uuid = lambda handle: "00000000-0000-0000-0000-000000000000"
    amdsmi.amdsmi_get_gpu_memory_total = lambda handle, kind: 192 * 1024**3
    amdsmi.amdsmi_topo_get_link_type = lambda a, b: {"hops": 1, "type": 2}
    amdsmi.amdsmi_topo_get_numa_node_number = lambda handle: 0
    sys.modules["amdsmi"] = amdsmi


def _rocm_module(arch: str):
    """vllm.platforms.rocm, (re)loaded so that its arch flags (_GCN_ARCH, _ON_MI3XX, ...)
    describe ``arch``. Functions vLLM already imported from it read the same globals."""
    import importlib

    _ROCM_ARCH["arch"] = arch
    _install_fake_amdsmi()
    module = sys.modules.get("vllm.platforms.rocm")
    if module is None:
        return importlib.import_module("vllm.platforms.rocm")
    module.RocmPlatform.get_device_capability.cache_clear()
    return importlib.reload(module)


def install_fake_rocm_platform(arch: str = "gfx942"):
    """Force vLLM's current platform to an AMD GPU of ``arch`` (gfx90a, gfx942, gfx950).

    vLLM modules imported before this keep the platform they imported; the ones that
    decide AITER and FP8 (``vllm._aiter_ops``, the pass manager, the configs) are pointed
    at the new one."""
    import vllm.platforms as platforms

    rocm = _rocm_module(arch)

    class FakeRocmPlatform(rocm.RocmPlatform):
        """A ROCm platform with a chosen arch and no device behind it."""

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 192 * 1024**3

        @classmethod
        def is_fully_connected(cls, physical_device_ids: list[int]) -> bool:
            return True

        @classmethod
        def device_count(cls) -> int:
            return 1

    platform = FakeRocmPlatform()
    old = platforms.current_platform
    platforms.current_platform = platform
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm") and getattr(module, "current_platform", None) is old:
            module.current_platform = platform
    aiter_ops = sys.modules.get("vllm._aiter_ops")
    if aiter_ops is not None:
        aiter_ops.FP8_DTYPE = platform.fp8_dtype()
    return platform


@contextlib.contextmanager
def simulated_gcn_arch(arch: str):
    """Temporarily change the simulated AMD GPU's arch."""
    saved = _ROCM_ARCH["arch"]
    _rocm_module(arch)
    try:
        yield
    finally:
        _rocm_module(saved)


def simulate_aiter(monkeypatch, present: bool, ops: tuple[str, ...] | None = None) -> None:
    """AITER installed and enabled (VLLM_ROCM_USE_AITER=1) or absent, as vLLM's probe and
    vllm_fusion.aiter see it. ``ops``: the AITER ops present (default: every one asked for)."""
    import vllm._aiter_ops as vllm_aiter

    from vllm_fusion import aiter

    def fake_op(name: str):
        if not present or (ops is not None and name not in ops):
            return None
        return lambda *args, **kwargs: None

    monkeypatch.setattr(vllm_aiter, "IS_AITER_FOUND", present)
    monkeypatch.setattr(vllm_aiter.rocm_aiter_ops, "_AITER_ENABLED", present)
    monkeypatch.setattr(aiter, "aiter_op", fake_op)
