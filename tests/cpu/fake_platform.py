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
