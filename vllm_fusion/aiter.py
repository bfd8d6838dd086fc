"""AMD's AITER (PyPI ``amd-aiter``, imported as ``aiter``): which of its ops this process has.

PyPI's ``aiter`` is an unrelated async-iterator library with the same import name, so AITER is
recognised by its ops, never by ``import aiter`` succeeding alone. Op names are attributes of
``aiter`` or dotted paths below it: ``"rmsnorm2d_fwd_with_dynamicquant"``,
``"ops.triton.activation.act_mul_and_fp8_group_quant"``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

# An op every AITER release has; aiter_available() without names looks for it.
_MARKER_OP = "rmsnorm2d_fwd"


@functools.cache
def aiter_op(name: str) -> Callable | None:
    """AITER's op ``name``, or None when AITER or that op is missing (or fails to import)."""
    module_path, _, attr = f"aiter.{name}".rpartition(".")
    try:
        module = importlib.import_module(module_path)
    except Exception:  # not installed, the namesake library, or a broken ROCm install
        return None
    op = getattr(module, attr, None)
    return op if callable(op) else None


def aiter_available(*op_names: str) -> bool:
    """AITER is installed and has every op named (without names: AITER itself is there)."""
    return all(aiter_op(name) is not None for name in (op_names or (_MARKER_OP,)))
