"""Compile-time kernel fusion for vLLM: Inductor post-grad passes and their kernels.

Importing the package does not import vLLM; vLLM loads the package through its
``vllm.general_plugins`` entry point (``vllm_fusion.plugin:register``).
"""

from vllm_fusion.version import __version__

__all__ = ["__version__"]
