"""GPU tests: run on the lent GPU machine, skipped without a CUDA GPU or the kernel library."""

from __future__ import annotations


def require_cuda_kernels(min_major: int = 0, why: str = "") -> None:
    """Skip the calling test module unless a CUDA GPU (compute capability major >= ``min_major``)
    and the package's kernel library are there. Call it at module level, before any import
    that needs them."""
    import pytest

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    if torch.cuda.get_device_capability()[0] < min_major:
        pytest.skip(why or f"needs an SM{min_major}0+ GPU", allow_module_level=True)

    from vllm_fusion import _kernels

    status = _kernels.load()
    if not status.loaded:
        pytest.skip(status.describe(), allow_module_level=True)
