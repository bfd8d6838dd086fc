"""Loggers that print through vLLM's own logging setup.

Loggers live under vLLM's ``vllm`` logger, so they honour VLLM_LOGGING_LEVEL and
VLLM_LOGGING_CONFIG_PATH and print in vLLM's format, e.g.
``INFO 11-27 13:00:00 [plugin.py:60] vllm_fusion 0.1.0: ...``.
"""

from vllm.logger import init_logger as _vllm_init_logger


def init_logger(name: str):
    return _vllm_init_logger(f"vllm.{name}")
