"""Every difference between the vLLM releases the package supports, in one place.

The package supports vLLM 0.26.0 (torch 2.11) and 0.33.0 (torch 2.14). What differs, as far
as the package touches it:

- ``PassConfig`` fields. 0.33 removed ``enable_sp``, ``fuse_gemm_comms`` and
  ``sp_min_token_num`` (and rejects unknown fields), so on 0.33 the package reads them from
  ``additional_config["vllm_fusion"]``; on 0.26 they stay vLLM's PassConfig fields.
- vLLM's pass classes per fusion. 0.33 has no ``SequenceParallelismPass`` / ``AsyncTPPass``.
- The norm canonicalization passes of 0.33 (``AddRMSNormFusionPass``: ``x + residual`` then
  ``vllm_ir.rms_norm`` becomes ``vllm_ir.fused_add_rms_norm``; ``RMSNormReshapeFusionPass``:
  output reshapes moved ahead of the norm). vLLM adds them, for Transformers-backend models,
  when ``fuse_act_padding``, ``fuse_allreduce_rms`` or ``fuse_norm_quant`` is on. The
  package's norm patterns match ``fused_add_rms_norm``, so these passes must keep running
  before them even when the package turns vLLM's flag off to replace vLLM's pass.
- ``fx_utils`` helpers: 0.33 removed ``is_auto_func``, ``find_getitem(_maybe)`` and
  ``get_only_user``; the package's copies are below.
- How an attention backend describes its KV cache. 0.26's backends have
  ``get_kv_cache_shape``; 0.33 dropped it and describes the logical per-layer page
  ``(blocks, heads, block_size, content bytes)`` from the layer's ``AttentionSpec``
  (``compute_layer_kv_cache_shape_bytes``). The layout is the same in both: FLASH_ATTN,
  TRITON_ATTN and FLASHINFER pack K and V in the last dim of a logical
  ``(blocks, kv_heads, block_size, 2 * head_size)`` cache and their ``do_kv_cache_update``
  takes ``kv_cache.transpose(1, 2).split(head_size, -1)``, so only the description differs.

Unchanged between the two (checked against both sources, so nothing here for them):
``PostGradPassManager.configure/add/uuid``, ``OPTIMIZATION_LEVEL_TO_CONFIG``'s structure
(``[level]["compilation_config"]["pass_config"][flag]``), ``vllm.config.utils.Range``,
``CompilationConfig.get_compile_ranges`` / ``splitting_ops_contain_kv_cache_update``,
``envs.compile_factors``, the pass base classes and ``MatcherQuantFP8``'s constructor.

Everything version dependent is decided from ``release()``, which tests can replace.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized

# Settings vLLM 0.26 has in PassConfig and 0.33 removed: option -> (type, meaning).
SP_SETTINGS: dict[str, tuple[type, str]] = {
    "enable_sp": (bool, "sequence parallelism"),
    "fuse_gemm_comms": (bool, "async TP (GEMM + collective fusion; implies enable_sp)"),
    "sp_min_token_num": (int, "minimum num_tokens for sequence parallelism"),
}

# 0.33's norm canonicalization passes -> the first fusion (vLLM order) they must run before.
NORM_CANONICALIZATION_PASSES: dict[str, str] = {
    "AddRMSNormFusionPass": "fuse_act_padding",
    "RMSNormReshapeFusionPass": "fuse_norm_quant",
}
# The flags whose being on makes vLLM 0.33 canonicalize (Transformers-backend models only).
NORM_CANONICALIZATION_FLAGS = ("fuse_act_padding", "fuse_allreduce_rms", "fuse_norm_quant")


@dataclass(frozen=True)
class Release:
    """What the package relies on in one vLLM release line."""

    version: str
    # Settings the package reads from additional_config["vllm_fusion"] (not in PassConfig).
    additional_config_settings: tuple[str, ...] = ()
    # Fusion flags (registry.FUSION_FLAGS) for which this release has no pass of its own.
    fusions_without_vllm_pass: tuple[str, ...] = ()
    # vLLM pass name -> fusion flag it must run before (canonicalization passes).
    canonicalization_passes: dict[str, str] = field(default_factory=dict)
    # Attention backends describe their KV cache shape with an AttentionSpec, not
    # get_kv_cache_shape.
    kv_cache_shape_from_spec: bool = False

    def has_vllm_pass(self, flag: str) -> bool:
        return flag not in self.fusions_without_vllm_pass

    def in_pass_config(self, name: str) -> bool:
        """Whether ``name`` (a fusion flag or an SP setting) is a PassConfig field here."""
        return name not in self.additional_config_settings


VLLM_0_26 = Release(version="0.26.0")
VLLM_0_33 = Release(
    version="0.33.0",
    additional_config_settings=tuple(SP_SETTINGS),
    fusions_without_vllm_pass=("enable_sp", "fuse_gemm_comms"),
    canonicalization_passes=dict(NORM_CANONICALIZATION_PASSES),
    kv_cache_shape_from_spec=True,
)
RELEASES: tuple[Release, ...] = (VLLM_0_26, VLLM_0_33)


def installed_vllm_version() -> str | None:
    """The installed vLLM's base version ("0.33.0"), without importing vLLM."""
    try:
        text = version("vllm")
    except PackageNotFoundError:
        return None
    from packaging.version import Version

    return Version(text).base_version


def release_for(vllm_version: str | None) -> Release:
    """The release line of ``vllm_version``: 0.33 and later -> 0.33's, older -> 0.26's."""
    from packaging.version import Version

    if vllm_version is None:
        return VLLM_0_26
    return VLLM_0_33 if Version(vllm_version) >= Version("0.33.0") else VLLM_0_26


@functools.cache
def release() -> Release:
    """The release line of the installed vLLM."""
    return release_for(installed_vllm_version())


# ------------------------------------------------------------------ KV cache

def attention_kv_cache_shape(backend_cls, num_blocks: int, block_size: int, num_kv_heads: int,
                             head_size: int, dtype) -> tuple[int, ...]:
    """The logical ``(blocks, kv_heads, block_size, 2 * head_size)`` shape of one layer's KV
    cache of ``dtype`` for a full-attention backend, as the installed vLLM describes it."""
    if not release().kv_cache_shape_from_spec:
        return tuple(backend_cls.get_kv_cache_shape(num_blocks, block_size, num_kv_heads,
                                                    head_size))
    from vllm.v1.kv_cache_interface import FullAttentionSpec, compute_layer_kv_cache_shape_bytes

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                             head_size=head_size, dtype=dtype)
    *outer, content_bytes = compute_layer_kv_cache_shape_bytes(spec, num_blocks)
    return (*outer, content_bytes // dtype.itemsize)


# ------------------------------------------------------------------ PassConfig

def pass_config_fields() -> frozenset[str]:
    """The field names of the installed vLLM's PassConfig."""
    import dataclasses

    from vllm.config.compilation import PassConfig

    return frozenset(f.name for f in dataclasses.fields(PassConfig))


def setting_source(name: str) -> str:
    """Where ``name`` comes from with the installed vLLM: "pass_config" or "additional_config"."""
    return "pass_config" if release().in_pass_config(name) else "additional_config"


def read_setting(vllm_config, name: str, options: dict | None = None):
    """An SP setting or fusion flag as the user set it; None when unset.

    0.26: ``compilation_config.pass_config.<name>``; 0.33, for the settings it removed:
    ``additional_config["vllm_fusion"][name]`` (``options`` = the parsed options, if at hand).
    """
    if setting_source(name) == "additional_config":
        if options is None:
            from vllm_fusion.config import parse_options

            options = parse_options(vllm_config.additional_config)
        return options.get(name)
    return getattr(vllm_config.compilation_config.pass_config, name, None)


def fusion_flag_values(vllm_config, flags, options: dict | None = None) -> dict[str, bool | None]:
    """Each fusion flag's value (None: unset), from wherever this vLLM keeps it."""
    return {flag: read_setting(vllm_config, flag, options) for flag in flags}


def pass_config_flag(pass_config, flag: str) -> bool:
    """A PassConfig flag's truth; False where this vLLM's PassConfig has no such field."""
    return bool(getattr(pass_config, flag, False))


# ------------------------------------------------------------------ pass list

def canonicalization_precedes(pass_name: str) -> str | None:
    """The fusion flag a vLLM canonicalization pass must run before; None if not one."""
    return release().canonicalization_passes.get(pass_name)


def norm_canonicalization_wanted(config) -> bool:
    """Whether vLLM 0.33 canonicalizes norms for ``config`` (its own condition), read
    before the package turns any flag off."""
    if not release().canonicalization_passes:
        return False
    pass_config = config.compilation_config.pass_config
    model_config = config.model_config
    if not any(pass_config_flag(pass_config, f) for f in NORM_CANONICALIZATION_FLAGS):
        return False
    try:
        return model_config is not None and bool(model_config.using_transformers_backend())
    except Exception:
        return False


def restore_norm_canonicalization(passes: list, config, wanted: bool, rank_of) -> list:
    """``passes`` with 0.33's canonicalization passes that vLLM skipped (because the package
    turned off the flags it keys on) put back where vLLM runs them.

    ``rank_of(p)`` is the position of a pass's fusion in vLLM's order; the pass goes right
    before the first pass of the fusion it must precede or of a later one."""
    if not wanted:
        return passes
    from vllm.compilation.passes.fusion import add_rms_fusion
    from vllm.config import set_current_vllm_config

    from vllm_fusion.passes.registry import FUSION_FLAGS

    present = {type(p).__name__ for p in passes}
    result = list(passes)
    with set_current_vllm_config(config, check_compile=False):
        for name, flag in release().canonicalization_passes.items():
            if name in present:
                continue
            rank = FUSION_FLAGS.index(flag)
            position = next((i for i, p in enumerate(result)
                             if type(p).__name__ != "NoOpEliminationPass"
                             and rank_of(p) >= rank), len(result))
            result.insert(position, getattr(add_rms_fusion, name)(config))
    return result


# ------------------------------------------------------------------ fx_utils (vendored)

def is_func(node: fx.Node, target) -> bool:
    return node.op == "call_function" and node.target == target


def is_auto_func(node: fx.Node, op) -> bool:
    """``node`` is ``auto_functionalized(op, ...)`` (vLLM 0.26 ``fx_utils``, gone in 0.33)."""
    return is_func(node, auto_functionalized) and node.args[0] == op


def find_getitem_maybe(node: fx.Node, idx: int) -> fx.Node | None:
    """The ``getitem`` user of ``node`` that extracts element ``idx``, if any."""
    for user in node.users:
        if is_func(user, operator.getitem) and user.args[1] == idx:
            return user
    return None


def find_getitem(node: fx.Node, idx: int) -> fx.Node:
    found = find_getitem_maybe(node, idx)
    if found is None:
        raise ValueError(f"no getitem {idx} of node {node}")
    return found


def get_only_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise ValueError(f"node {node} has {len(node.users)} users, expected 1")
    return next(iter(node.users))


# ------------------------------------------------------------------ logging

def configure_vllm_logging() -> None:
    """Set up vLLM's log handlers as its entry points do.

    vLLM 0.26 configures its root logger when ``vllm.logger`` is imported; 0.33 only when an
    entry point (``vllm serve``, ``LLM``...) applies a ``LoggingConfig``, so a bare process
    (a test, a script) prints nothing below WARNING until this runs."""
    import vllm.logger as vllm_logger

    configure = getattr(vllm_logger, "configure_logging_if_needed", None)
    if configure is None:
        return  # 0.26: configured at import
    from vllm.config.logging import LoggingConfig

    configure(LoggingConfig())
