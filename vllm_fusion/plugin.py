"""vLLM general-plugin entry point: ``vllm_fusion = "vllm_fusion.plugin:register"``.

vLLM calls ``register()`` in every process it starts (API server, engine core,
workers; spawn or fork). It is idempotent, cheap, and never raises: a failure
is logged and vLLM runs without the package's fusions.
"""

from __future__ import annotations

from vllm_fusion import _kernels, compat
from vllm_fusion.logger import init_logger
from vllm_fusion.passes.registry import ownership
from vllm_fusion.version import SUPPORTED_VLLM, __version__

logger = init_logger(__name__)

_registered = False
# How many times registration ran in this process (tests assert it is 1).
registration_count = 0


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    try:
        _register()
    except Exception:
        logger.exception("vllm_fusion: registration failed; vLLM runs without its fusions")


def _check_vllm_version() -> None:
    import vllm
    from packaging.version import Version

    found = Version(vllm.__version__).base_version
    if found not in SUPPORTED_VLLM:
        logger.warning(
            "vllm_fusion %s supports vLLM %s; found %s. Its passes may not match "
            "this version's graphs and will then leave them unfused.",
            __version__, " / ".join(SUPPORTED_VLLM), vllm.__version__,
        )


def _register() -> None:
    global registration_count
    from vllm_fusion.passes.pass_manager_hook import (
        install_compile_factors_hook,
        install_compile_ranges_hook,
        install_config_validation,
        install_level_defaults,
        install_pass_config_hook,
        install_pass_manager_hook,
        install_splitting_ops_hook,
    )

    registration_count += 1
    _check_vllm_version()
    kernels = _kernels.load()
    install_pass_manager_hook()
    install_compile_factors_hook()
    install_level_defaults()
    install_pass_config_hook()
    install_config_validation()
    install_splitting_ops_hook()
    install_compile_ranges_hook()
    who = ownership(compat.release())
    logger.info(
        "vllm_fusion %s: %s; fusions: %s; vLLM's own pass kept for: %s; no pass in this vLLM: "
        "%s", __version__, kernels.describe(), ", ".join(who["owned"]) or "none",
        ", ".join(who["delegated"]) or "none", ", ".join(who["unavailable"]) or "none",
    )
