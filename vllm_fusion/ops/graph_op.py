"""Registration of the package's Python ops that compiled graphs call (they import vLLM)."""

from __future__ import annotations

import torch
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

_lib = Library("vllm_fusion", "FRAGMENT")


def register_graph_op(name: str, impl, fake) -> None:
    """``torch.ops.vllm_fusion.<name>`` from ``impl`` and its ``fake``, once per process."""
    try:
        getattr(torch.ops.vllm_fusion, name).default
        return
    except (AttributeError, RuntimeError):
        pass
    direct_register_custom_op(op_name=name, op_func=impl, mutates_args=[], fake_impl=fake,
                              target_lib=_lib)
