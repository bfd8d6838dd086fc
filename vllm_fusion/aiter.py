"""Detecting AMD's AITER kernel library, never as a hard dependency.

AITER is published on PyPI as ``amd-aiter`` and imported as ``aiter``. PyPI's own
``aiter`` package is an unrelated async-iterator library with the same import name,
so an importable ``aiter`` proves nothing: AITER counts as present only when the ops
asked for are found in it.

Op names are attribute paths below the ``aiter`` package: ``"rmsnorm2d_fwd_with_add"``
is ``aiter.rmsnorm2d_fwd_with_add``, and
``"ops.triton.fused_add_rmsnorm_pad.fused_add_rmsnorm_pad"`` imports the module
``aiter.ops.triton.fused_add_rmsnorm_pad`` and takes its ``fused_add_rmsnorm_pad``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch

PACKAGE = "aiter"


def _is_rocm_torch() -> bool:
    # AITER's kernels are HIP/Triton-on-ROCm only.
    return torch.version.hip is not None


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception:
        # A broken install (missing HIP runtime, JIT failure...) is "not available".
        return None


def _resolve(name: str):
    """The object at ``aiter.<name>``, importing submodules along the way; None if absent."""
    parts = name.split(".")
    obj = _import(PACKAGE)
    path = PACKAGE
    for part in parts:
        if obj is None:
            return None
        path = f"{path}.{part}"
        child = getattr(obj, part, None)
        if child is None:
            # Submodules are attributes only once imported.
            child = _import(path)
        obj = child
    return obj


@functools.cache
def aiter_op(name: str) -> Callable | None:
    """AITER's op ``aiter.<name>`` if the installed ``aiter`` is AMD's and has it, else None."""
    if not name or any(not part.isidentifier() for part in name.split(".")):
        raise ValueError(
            f"aiter op name must be a dotted attribute path below 'aiter' "
            f"(e.g. 'rmsnorm2d_fwd_with_add'), got {name!r}")
    try:
        if importlib.util.find_spec(PACKAGE) is None:
            return None
    except (ImportError, ValueError):
        return None
    op = _resolve(name)
    return op if callable(op) else None


def aiter_available(*op_names: str) -> bool:
    """Whether AMD's AITER can run every op in ``op_names`` here: a ROCm build of torch and
    each op found in the installed ``aiter``. With no names, checks its basic RMSNorm op,
    which the unrelated PyPI ``aiter`` lacks."""
    if not _is_rocm_torch():
        return False
    names = op_names or ("rmsnorm2d_fwd_with_add",)
    return all(aiter_op(name) is not None for name in names)
