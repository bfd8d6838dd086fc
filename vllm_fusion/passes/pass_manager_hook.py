"""Hooks into vLLM's compilation: the post-grad pass list and the cache key.

``PostGradPassManager.configure`` is wrapped so that, after vLLM has built its
pass list, each fusion the package implements replaces vLLM's instance (or is
inserted at vLLM's position for it). The wrap is applied when vLLM imports its
pass-manager module, so processes that never compile import nothing extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.machinery
import sys

from vllm_fusion import _kernels, compat
from vllm_fusion.config import (
    FusionConfigError,
    FusionSettings,
    autoconfig,
    resolve,
    warn_decision,
)
from vllm_fusion.logger import init_logger
from vllm_fusion.passes.registry import FUSIONS, Fusion
from vllm_fusion.version import __version__

logger = init_logger(__name__)

PASS_MANAGER_MODULE = "vllm.compilation.passes.pass_manager"
_WRAPPED = "__vllm_fusion_wrapped__"

# vLLM pass class name / fusion flag -> position of its fusion in vLLM's order.
_RANK = {name: rank for rank, f in enumerate(FUSIONS) for name in f.vllm_passes}
_FLAG_RANK = {f.flag: rank for rank, f in enumerate(FUSIONS)}


def _rank_of(p) -> float:
    """Position in vLLM's order of the fusion a pass (vLLM's or the package's) serves."""
    name = type(p).__name__
    rank = _RANK.get(name)
    if (precedes := compat.canonicalization_precedes(name)) is not None:
        return _FLAG_RANK[precedes] - 0.5  # vLLM 0.33 norm canonicalization: just before
    if rank is None:  # the package's passes carry their flag
        rank = _FLAG_RANK.get(getattr(p, "flag", None), len(FUSIONS))
    return rank


def _insert_position(passes: list, fusion: Fusion) -> int:
    """Index right after the last pass of a fusion vLLM runs before ``fusion``."""
    rank = FUSIONS.index(fusion)
    position = 0
    for i, p in enumerate(passes):
        if type(p).__name__ == "NoOpEliminationPass" or _rank_of(p) < rank:
            position = i + 1
    return position


def place_pass(passes: list, fusion: Fusion, new_pass) -> list:
    """``passes`` with vLLM's passes for ``fusion`` replaced by ``new_pass``."""
    theirs = [i for i, p in enumerate(passes) if type(p).__name__ in fusion.vllm_passes]
    if theirs:
        kept = [p for i, p in enumerate(passes) if i not in theirs[1:]]
        kept[theirs[0]] = new_pass
        return kept
    position = _insert_position(passes, fusion)
    return passes[:position] + [new_pass] + passes[position:]


def add_companions(passes: list, fusion: Fusion, new_pass, config) -> list:
    """``passes`` with vLLM's passes that share ``fusion``'s flag (turned off while vLLM
    configured) put back right after the package's pass."""
    from vllm.config import set_current_vllm_config

    try:
        with set_current_vllm_config(config, check_compile=False):
            companions = fusion.build_companions(config)
    except Exception as e:  # never stop vLLM: the package's pass still runs
        logger.warning("vllm_fusion: vLLM's other %s passes could not be set up (%s: %s)",
                       fusion.flag, type(e).__name__, e)
        return passes
    if not companions:
        return passes
    position = passes.index(new_pass) + 1
    return passes[:position] + companions + passes[position:]


def _build_pass(fusion: Fusion, config, settings: FusionSettings):
    """The package's pass for ``fusion``, or None (with the reason logged).

    Without kernels the fusion never gets here: the settings delegate it to vLLM."""
    try:
        return fusion.load_pass_class()(config, settings)
    except Exception as e:  # a broken pass must never stop vLLM
        logger.warning(
            "vllm_fusion: %s could not be set up (%s: %s); keeping vLLM's pass",
            fusion.flag, type(e).__name__, e,
        )
        return None


def build_package_passes(config, settings: FusionSettings) -> dict[Fusion, object]:
    """The package's pass for every fusion it implements and the settings enable."""
    from vllm.config import set_current_vllm_config

    if not settings.enabled:
        return {}
    built = {}
    with set_current_vllm_config(config, check_compile=False):
        for fusion in FUSIONS:
            if (fusion.package_pass is None or not settings.fusions.get(fusion.flag)
                    or fusion.flag in settings.delegated):
                continue
            new_pass = _build_pass(fusion, config, settings)
            if new_pass is not None:
                built[fusion] = new_pass
    return built


@contextlib.contextmanager
def flags_turned_off(pass_config, flags: list[str]):
    """vLLM skips building its own pass for these flags (it would be discarded)."""
    saved = {flag: getattr(pass_config, flag) for flag in flags}
    try:
        for flag in flags:
            setattr(pass_config, flag, False)
        yield
    finally:
        for flag, value in saved.items():
            setattr(pass_config, flag, value)


def configure_with_package_passes(original, manager, config) -> None:
    """``PostGradPassManager.configure`` with the package's passes swapped in."""
    try:
        settings = resolve(config)
    except FusionConfigError:
        raise  # a bad configuration stops vLLM, by design (startup has checked it already)
    except Exception as e:  # a bug of the package: compile with vLLM's passes only
        logger.warning(
            "vllm_fusion: could not resolve its settings (%s: %s); compiling with vLLM's "
            "passes only", type(e).__name__, e,
        )
        original(manager, config)
        return
    try:
        ours = build_package_passes(config, settings)
    except Exception as e:  # never stop vLLM: compile with its passes only
        logger.warning(
            "vllm_fusion: could not set up its passes (%s: %s); compiling with vLLM's "
            "passes only", type(e).__name__, e,
        )
        ours = {}
    pass_config = config.compilation_config.pass_config
    # vLLM builds no pass for a fusion the package replaces or the matrix rules out.
    vetoed = [flag for flag, on in settings.fusions.items()
              if getattr(pass_config, flag, False) and not on]
    canonicalize = compat.norm_canonicalization_wanted(config)
    with flags_turned_off(pass_config, [fusion.flag for fusion in ours] + vetoed):
        original(manager, config)
    # vLLM 0.33 keys its norm canonicalization on flags turned off just above.
    manager.passes = compat.restore_norm_canonicalization(
        manager.passes, config, canonicalize, _rank_of)
    for fusion, new_pass in ours.items():
        manager.passes = place_pass(manager.passes, fusion, new_pass)
        manager.passes = add_companions(manager.passes, fusion, new_pass, config)
    logger.debug(
        "vllm_fusion: post-grad passes: %s",
        ", ".join(f"{type(p).__module__.split('.')[0]}:{type(p).__name__}" for p in manager.passes),
    )


def _register_graph_ops() -> None:
    """The package's Python ops that compiled graphs call: registered wherever vLLM compiles
    or loads a compiled graph (a cache hit runs no pass that would import them)."""
    for module, op in (("rope_cache_update", "rope_kv_cache_update"),
                       ("fused_allreduce", "fused_all_reduce_rms_norm")):
        try:
            importlib.import_module(f"vllm_fusion.ops.{module}")
        except Exception as e:  # the pass that needs the op then fails to build and says so
            logger.warning("vllm_fusion: could not register vllm_fusion::%s (%s: %s)", op,
                           type(e).__name__, e)


def _wrap_configure(manager_cls) -> None:
    original = manager_cls.configure
    if getattr(original, _WRAPPED, False):
        return
    _register_graph_ops()

    @functools.wraps(original)
    def configure(self, config) -> None:
        configure_with_package_passes(original, self, config)

    setattr(configure, _WRAPPED, True)
    manager_cls.configure = configure


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``_wrap_configure`` right after vLLM's pass-manager module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != PASS_MANAGER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _wrap_configure(module.PostGradPassManager)


def install_pass_manager_hook() -> None:
    module = sys.modules.get(PASS_MANAGER_MODULE)
    if module is not None:
        _wrap_configure(module.PostGradPassManager)
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


def is_pass_manager_hooked() -> bool:
    module = sys.modules.get(PASS_MANAGER_MODULE)
    if module is None:
        return any(isinstance(f, _PatchAfterImport) for f in sys.meta_path)
    return getattr(module.PostGradPassManager.configure, _WRAPPED, False)


def install_level_defaults() -> None:
    """Make the matrix vLLM's -O1..-O3 default for the fusions the package implements."""
    from vllm.config import vllm as vllm_config_module

    from vllm_fusion.matrix import load_matrix

    implemented = {f.flag for f in FUSIONS if f.package_pass is not None}
    for level, defaults in vllm_config_module.OPTIMIZATION_LEVEL_TO_CONFIG.items():
        pass_defaults = defaults.get("compilation_config", {}).get("pass_config", {})
        for flag in sorted(implemented & set(load_matrix())):
            if int(level) > 0 and flag in pass_defaults:
                pass_defaults[flag] = autoconfig(flag)


# PassConfig flags vLLM 0.26 forces off off-ROCm (PassConfig.__post_init__) that the package
# runs elsewhere too.
VLLM_ROCM_ONLY_FLAGS = ("fuse_act_padding", "fuse_rope_kvcache")


def install_pass_config_hook() -> None:
    """Keep an explicit True of ``VLLM_ROCM_ONLY_FLAGS`` through vLLM's platform gate.

    The package's resolver then decides from the matrix whether this platform runs the
    fusion (and warns once if it cannot), as for every fusion the package implements.
    """
    from vllm.config.compilation import PassConfig

    original = PassConfig.__post_init__
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def __post_init__(self) -> None:
        kept = [flag for flag in VLLM_ROCM_ONLY_FLAGS if getattr(self, flag, None) is True]
        # Hidden from vLLM's gate (unset), so that it neither turns them off nor warns.
        for flag in kept:
            setattr(self, flag, None)
        try:
            original(self)
        finally:
            for flag in kept:
                setattr(self, flag, True)

    setattr(__post_init__, _WRAPPED, True)
    PassConfig.__post_init__ = __post_init__


def install_config_validation() -> None:
    """Check ``additional_config["vllm_fusion"]`` whenever vLLM builds its config.

    The API server builds it before any worker starts, so a bad option stops
    ``vllm serve`` at startup at every optimization level (-O0 runs no pass that
    would read the options later)."""
    from vllm.config import VllmConfig

    from vllm_fusion.config import parse_options

    original = VllmConfig.__post_init__
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def __post_init__(self) -> None:
        parse_options(self.additional_config)
        original(self)

    setattr(__post_init__, _WRAPPED, True)
    VllmConfig.__post_init__ = __post_init__


# vLLM's splitting op for the KV-cache update of (non-MLA) attention layers.
KV_CACHE_UPDATE_OP = "vllm::unified_kv_cache_update"
ROPE_FLAGS = ("fuse_rope_kvcache", "enable_qk_norm_rope_fusion")
_post_init_config: contextvars.ContextVar = contextvars.ContextVar(
    "vllm_fusion_post_init_config", default=None)


def _rope_decisions(vllm_config) -> dict:
    from vllm_fusion.resolver import Setup, resolve_fusion

    setup = Setup.from_vllm_config(vllm_config)
    return {flag: resolve_fusion(flag, setup) for flag in ROPE_FLAGS}


def _ensure_rotary_custom_op(compilation) -> None:
    """The RoPE patterns match vLLM's rotary custom op, as vLLM's own RoPE passes do; vLLM
    appends it only for flags set explicitly, not for level defaults."""
    if not any(op in compilation.custom_ops for op in ("+rotary_embedding", "-rotary_embedding")):
        compilation.custom_ops.append("+rotary_embedding")


def _keeps_kv_update_in_graph(compilation, decision) -> bool:
    """Whether vLLM would split the KV-cache update out of the graph (and turn the fusion
    off) only because the user left splitting_ops unset."""
    from vllm.config import CompilationMode

    return (decision.enabled and decision.route in ("vllm_fusion", "aiter")
            and compilation.splitting_ops is None
            and not compilation.use_inductor_graph_partition
            and compilation.mode == CompilationMode.VLLM_COMPILE
            and not compilation.pass_config.fuse_attn_quant)


def arrange_rope_fusions(original, compilation, vllm_config, *args, **kwargs) -> None:
    """``CompilationConfig.set_splitting_ops_for_v1`` with what the RoPE fusions need."""
    decisions = _rope_decisions(vllm_config)
    for flag in ROPE_FLAGS:
        if decisions[flag].enabled:
            _ensure_rotary_custom_op(compilation)
    rope = decisions["fuse_rope_kvcache"]
    warn_decision(rope)
    if not _keeps_kv_update_in_graph(compilation, rope):
        original(compilation, *args, **kwargs)
        return
    with flags_turned_off(compilation.pass_config, ["fuse_rope_kvcache"]):
        original(compilation, *args, **kwargs)
    if compilation.splitting_ops and KV_CACHE_UPDATE_OP in compilation.splitting_ops:
        compilation.splitting_ops.remove(KV_CACHE_UPDATE_OP)
        logger.info_once(
            "vllm_fusion: fuse_rope_kvcache keeps %s in the compiled graph (not a splitting "
            "op) so that RoPE and the KV-cache write fuse", KV_CACHE_UPDATE_OP)


def install_splitting_ops_hook() -> None:
    """Arrange the graph splitting and custom ops the RoPE fusions need, in VllmConfig's
    ``__post_init__`` (where vLLM decides its splitting ops, after the level defaults)."""
    from vllm.config import CompilationConfig, VllmConfig

    original_split = CompilationConfig.set_splitting_ops_for_v1
    if getattr(original_split, _WRAPPED, False):
        return

    @functools.wraps(original_split)
    def set_splitting_ops_for_v1(self, *args, **kwargs) -> None:
        vllm_config = _post_init_config.get()
        if vllm_config is None or vllm_config.compilation_config is not self:
            original_split(self, *args, **kwargs)
            return
        try:
            arrange_rope_fusions(original_split, self, vllm_config, *args, **kwargs)
        except FusionConfigError:
            raise
        except Exception as e:  # never stop vLLM: its own splitting
            logger.warning("vllm_fusion: could not arrange the RoPE fusions (%s: %s)",
                           type(e).__name__, e)
            if self.splitting_ops is None:
                original_split(self, *args, **kwargs)

    original_init = VllmConfig.__post_init__

    @functools.wraps(original_init)
    def __post_init__(self) -> None:
        token = _post_init_config.set(self)
        try:
            original_init(self)
        finally:
            _post_init_config.reset(token)

    setattr(set_splitting_ops_for_v1, _WRAPPED, True)
    # Not _WRAPPED: that marks install_config_validation's wrapper of the same method.
    setattr(__post_init__, "__vllm_fusion_tracks_config__", True)
    CompilationConfig.set_splitting_ops_for_v1 = set_splitting_ops_for_v1
    VllmConfig.__post_init__ = __post_init__


def allreduce_sizes(vllm_config):
    """The package's fused all-reduce message sizes for this config when its
    ``fuse_allreduce_rms`` runs here; else None."""
    from vllm_fusion.passes.allreduce_rms_fusion import FLAG, message_sizes
    from vllm_fusion.resolver import Setup, resolve_fusion

    pass_config = vllm_config.compilation_config.pass_config
    if not getattr(pass_config, FLAG, False) or vllm_config.model_config is None:
        return None
    setup = Setup.from_vllm_config(vllm_config)
    decision = resolve_fusion(FLAG, setup)
    if not decision.enabled or decision.route != "vllm_fusion":
        return None
    return message_sizes(setup.platform, setup.tp, setup.allreduce_max_mib)


def install_compile_ranges_hook() -> None:
    """Add the fused all-reduce's size thresholds to vLLM's compile-range endpoints.

    vLLM 0.26 adds an endpoint for ``fuse_allreduce_rms`` from
    ``pass_config.fi_allreduce_fusion_max_size_mb`` (or FlashInfer's own table); the package's
    limit is put there while vLLM computes the ranges. Its lower limit (below which vLLM's
    all-reduce + a separate norm are faster) becomes an endpoint too, so the range where the
    fused kernel wins is compiled on its own and the pass fires exactly there."""
    from vllm.config import VllmConfig

    original = getattr(VllmConfig, "_set_compile_ranges", None)
    if original is None or getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def _set_compile_ranges(self) -> None:
        try:
            sizes = allreduce_sizes(self)
        except FusionConfigError:
            raise
        except Exception as e:  # never stop vLLM: its own ranges
            logger.warning("vllm_fusion: could not size the fused all-reduce (%s: %s)",
                           type(e).__name__, e)
            sizes = None
        if sizes is None:
            original(self)
            return
        compilation = self.compilation_config
        pass_config = compilation.pass_config
        user_limit = pass_config.fi_allreduce_fusion_max_size_mb
        row_bytes = self.model_config.get_hidden_size() * self.model_config.dtype.itemsize
        min_tokens = -(-sizes.min_bytes // row_bytes)
        if min_tokens > 1:
            compilation.compile_ranges_endpoints = [
                *(compilation.compile_ranges_endpoints or []), min_tokens - 1]
        pass_config.fi_allreduce_fusion_max_size_mb = sizes.max_bytes / 2**20
        try:
            original(self)
        finally:
            pass_config.fi_allreduce_fusion_max_size_mb = user_limit

    setattr(_set_compile_ranges, _WRAPPED, True)
    VllmConfig._set_compile_ranges = _set_compile_ranges


def _current_settings_digest() -> str:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        return "no-config"
    try:
        return resolve(config).digest()
    except FusionConfigError:
        raise
    except Exception as e:  # the configure hook then keeps vLLM's passes: say so in the key
        return f"unresolved: {type(e).__name__}: {e}"


def install_compile_factors_hook() -> None:
    """Fold the package into vLLM's compile-cache key.

    vLLM's key does not include pass uuids: on a cache hit no pass runs, so a
    changed package would otherwise silently reuse graphs compiled by an older one.
    """
    import vllm.envs as envs

    original = envs.compile_factors
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def compile_factors() -> dict[str, object]:
        factors = original()
        factors["VLLM_FUSION_VERSION"] = __version__
        factors["VLLM_FUSION_KERNELS"] = _kernels.load().library_hash
        factors["VLLM_FUSION_SETTINGS"] = _current_settings_digest()
        return factors

    setattr(compile_factors, _WRAPPED, True)
    envs.compile_factors = compile_factors
