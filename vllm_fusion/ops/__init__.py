"""Python side of the fused ops in ``torch.ops.vllm_fusion``: fake impls and torch references.

Importing this package loads the kernel library ``vllm_fusion._C`` when it is installed (the
library defines the ops) and registers a fake impl for each op, so the ops trace under
FakeTensorMode / torch.compile. Without the library the references below still work; the
fakes are then simply not registered. Nothing here imports vLLM.
"""

from __future__ import annotations

import importlib

import torch

from vllm_fusion.ops import act_quant, allreduce_norm, norm_pad, norm_quant, rope
from vllm_fusion.ops.act_quant import (
    silu_and_mul_dynamic_fp8_quant_ref,
    silu_and_mul_nvfp4_quant_ref,
    silu_and_mul_ref,
    silu_and_mul_static_fp8_quant_ref,
)
from vllm_fusion.ops.allreduce_norm import all_reduce_ref, all_reduce_rms_norm_ref
from vllm_fusion.ops.fp8 import (
    dynamic_fp8_quant_ref,
    fp8_dtype,
    fp8_max,
    fp8_min_scale,
    per_group_fp8_quant_ref,
    per_token_fp8_quant_ref,
    static_fp8_quant_ref,
)
from vllm_fusion.ops.norm_pad import fused_add_rms_norm_pad_ref, rms_norm_pad_ref
from vllm_fusion.ops.norm_quant import (
    fused_add_rms_norm_dynamic_fp8_quant_ref,
    fused_add_rms_norm_nvfp4_quant_ref,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_static_fp8_quant_ref,
    rms_norm_dynamic_fp8_quant_ref,
    rms_norm_nvfp4_quant_ref,
    rms_norm_ref,
    rms_norm_static_fp8_quant_ref,
)
from vllm_fusion.ops.nvfp4 import nvfp4_dequant_ref, nvfp4_quant_ref
from vllm_fusion.ops.rope import (
    kv_cache_write_ref,
    qk_norm_rope_kv_cache_ref,
    qk_norm_rope_ref,
    rope_ref,
)

NAMESPACE = "vllm_fusion"
OPS = norm_quant.OPS + act_quant.OPS + norm_pad.OPS + rope.OPS + allreduce_norm.OPS

_fakes_registered = False


def ops_defined() -> bool:
    """Whether every op of this package exists in torch.ops.vllm_fusion."""
    ns = getattr(torch.ops, NAMESPACE)
    for name in OPS:
        try:
            getattr(ns, name)
        except (AttributeError, RuntimeError):
            return False
    return True


def register_fakes() -> bool:
    """Load the library if needed and register the fakes once. Returns whether they are."""
    global _fakes_registered
    if _fakes_registered:
        return True
    if not ops_defined():
        try:
            importlib.import_module("vllm_fusion._C")
        except (ImportError, OSError, RuntimeError):
            return False
        if not ops_defined():
            return False
    norm_quant.register_fakes()
    act_quant.register_fakes()
    norm_pad.register_fakes()
    rope.register_fakes()
    allreduce_norm.register_fakes()
    _fakes_registered = True
    return True


register_fakes()

__all__ = [
    "OPS",
    "all_reduce_ref",
    "all_reduce_rms_norm_ref",
    "dynamic_fp8_quant_ref",
    "fp8_dtype",
    "fp8_max",
    "fp8_min_scale",
    "fused_add_rms_norm_dynamic_fp8_quant_ref",
    "fused_add_rms_norm_pad_ref",
    "fused_add_rms_norm_nvfp4_quant_ref",
    "fused_add_rms_norm_ref",
    "fused_add_rms_norm_static_fp8_quant_ref",
    "kv_cache_write_ref",
    "ops_defined",
    "nvfp4_dequant_ref",
    "nvfp4_quant_ref",
    "per_group_fp8_quant_ref",
    "per_token_fp8_quant_ref",
    "qk_norm_rope_kv_cache_ref",
    "qk_norm_rope_ref",
    "register_fakes",
    "rms_norm_dynamic_fp8_quant_ref",
    "rms_norm_pad_ref",
    "rms_norm_nvfp4_quant_ref",
    "rms_norm_ref",
    "rms_norm_static_fp8_quant_ref",
    "rope_ref",
    "silu_and_mul_dynamic_fp8_quant_ref",
    "silu_and_mul_nvfp4_quant_ref",
    "silu_and_mul_ref",
    "silu_and_mul_static_fp8_quant_ref",
    "static_fp8_quant_ref",
]
