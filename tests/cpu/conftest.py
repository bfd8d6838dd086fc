"""CPU test session: a loadable libcuda and a simulated H100 before vLLM loads.

Every test here runs in a forked child (pytest-forked), so patches, dynamo
state and registered patterns never leak from one test into the next.
"""

import logging
from pathlib import Path

import pytest

from tests.cpu.fake_platform import install_fake_cuda_platform, load_libcuda

load_libcuda()
install_fake_cuda_platform((9, 0))

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.forked)


@pytest.fixture
def kernels():
    """The compiled ops; required where VLLM_FUSION_REQUIRE_KERNELS=1 (CI)."""
    import os

    from vllm_fusion import _kernels

    status = _kernels.load()
    if not status.loaded:
        if os.environ.get("VLLM_FUSION_REQUIRE_KERNELS") == "1":
            pytest.fail(f"VLLM_FUSION_REQUIRE_KERNELS=1 but {status.describe()}")
        pytest.skip(status.describe())
    return status


@pytest.fixture
def pass_hook(kernels):
    """The package's passes in vLLM's pass manager, as the plugin installs them."""
    from vllm_fusion.passes.pass_manager_hook import install_pass_manager_hook

    install_pass_manager_hook()


@pytest.fixture
def vllm_logs(caplog):
    """vLLM's log records (the package logs under ``vllm.``), from DEBUG up."""
    logging.getLogger("vllm").propagate = True
    with caplog.at_level(logging.DEBUG, logger="vllm"):
        yield caplog
