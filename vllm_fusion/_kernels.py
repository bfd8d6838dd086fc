"""Loading the compiled kernel library ``vllm_fusion._C``.

The library registers its ops as ``torch.ops.vllm_fusion.*``. It is optional:
an install with ``VLLM_FUSION_TARGET_DEVICE=empty`` has none, and every pass
that needs a kernel then reports itself unavailable instead of failing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

NAMESPACE = "vllm_fusion"


@dataclass(frozen=True)
class KernelStatus:
    loaded: bool
    # Why the library is absent or failed to load; empty when loaded.
    reason: str
    # sha256 of the shared object ("none" without one): part of every cache key.
    library_hash: str
    path: str | None = None

    def describe(self) -> str:
        if self.loaded:
            return f"kernels loaded ({Path(self.path).name}, sha256 {self.library_hash[:12]})"
        return f"kernels not loaded: {self.reason}"


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("vllm_fusion._C")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def load() -> KernelStatus:
    """Import ``vllm_fusion._C`` once per process; never raises."""
    path = _library_path()
    if path is None:
        return KernelStatus(
            loaded=False,
            reason="vllm_fusion._C is not installed (built with "
            "VLLM_FUSION_TARGET_DEVICE=empty, or the build was skipped)",
            library_hash="none",
        )
    digest = _sha256(path)
    try:
        importlib.import_module("vllm_fusion._C")
    except (ImportError, OSError, RuntimeError) as e:
        return KernelStatus(False, f"importing {path.name} failed: {e}", digest, str(path))
    # Python-side fakes and references for the ops the library just defined.
    importlib.import_module("vllm_fusion.ops")
    return KernelStatus(True, "", digest, str(path))


def has_op(name: str) -> bool:
    """Whether ``torch.ops.vllm_fusion.<name>`` exists in this process."""
    return load().loaded and hasattr(getattr(torch.ops, NAMESPACE), name)
