"""Which fusion runs, and why: one pure function for vLLM, the CLI and the tests.

``resolve_setup(setup)`` decides each of the nine fusions from a ``Setup``: the
platform id, the optimization level, the user's explicit flags, the parallel
sizes, the model's dtype and quantization scheme, the custom-op and IR-priority
state and the graph splitting. ``Setup.from_vllm_config`` builds one from a real
VllmConfig; the CLI and the table-driven tests build one by hand.

Rules, for every fusion:
- an explicit False always wins;
- an explicit True wins unless the platform or setup cannot run the fusion; it
  is then turned off and the decision carries one warning saying why;
- an unset flag takes the level default: for the package's fusions the matrix,
  for vLLM's own fusions what vLLM 0.26's predicates decide (the package never
  changes those; their decision here is informative).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vllm_fusion import compat
from vllm_fusion.matrix import FusionCapability, load_full_matrix, load_matrix, platform_vendor
from vllm_fusion.passes.registry import FUSION_FLAGS

LEVELS = (0, 1, 2, 3)
DTYPES = ("float16", "bfloat16", "float32")

# Flash-Infer's fused all-reduce world sizes (PassConfig.flashinfer_max_size).
_FI_WORLD_SIZES = (2, 4, 8, 16)
# vLLM 0.26's SP_MIN_HIDDEN_SIZE (sequence_parallelism.py), per platform id.
_SP_FLAGS = ("enable_sp", "fuse_gemm_comms")


def platform_ids() -> tuple[str, ...]:
    return tuple(load_full_matrix().platforms)


def scheme_ids() -> tuple[str, ...]:
    return tuple(load_full_matrix().schemes)


@dataclass(frozen=True)
class Setup:
    """Everything the decision depends on. Defaults: vLLM's defaults."""

    platform: str
    level: int = 2
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # scheme id (matrix.toml [schemes]); None: unknown
    quant: str | None = "unquantized"
    dtype: str = "bfloat16"
    # flags the user set (-cc.pass_config.<flag>=True|False); unset flags are absent
    flags: Mapping[str, bool] = field(default_factory=dict)
    # custom ops turned on (+rms_norm, +quant_fp8, +silu_and_mul, +rotary_embedding)
    custom_ops: tuple[str, ...] = ()
    rms_norm_priority: str = "native"
    fused_add_rms_norm_priority: str = "native"
    graph_partition: bool = False
    # The user's own compilation_config.splitting_ops hold vllm::unified_kv_cache_update (the
    # KV-cache update then runs outside the compiled graph). Unset splitting_ops don't count:
    # the package keeps the update in the graph when fuse_rope_kvcache is on.
    kv_update_split: bool = False
    hidden_size: int | None = None
    # None: unknown (assumed present when simulating)
    has_flashinfer: bool | None = None
    has_aiter: bool | None = None
    # AITER ops found (vllm_fusion.aiter names); None: not probed, all assumed present
    aiter_ops: tuple[str, ...] | None = None
    kernels_loaded: bool = True
    # additional_config["vllm_fusion"]
    package_enabled: bool = True
    force_schemes: bool = False
    scheme_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # pass_config.sp_min_token_num (vLLM 0.26) / additional_config (0.33); None: unset
    sp_min_token_num: int | None = None
    # pass_config.fi_allreduce_fusion_max_size_mb: the user's fused all-reduce limit
    allreduce_max_mib: float | None = None
    # The vLLM release decided for (its passes and settings differ): the installed one.
    vllm: str = field(default_factory=lambda: compat.release().version)

    @property
    def vendor(self) -> str:
        return platform_vendor(self.platform)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = dict(self.flags)
        d["scheme_overrides"] = {k: list(v) for k, v in self.scheme_overrides.items()}
        d["custom_ops"] = list(self.custom_ops)
        d["aiter_ops"] = None if self.aiter_ops is None else list(self.aiter_ops)
        return d

    @classmethod
    def from_vllm_config(cls, vllm_config, platform: str | None = None,
                         flags: Mapping[str, bool] | None = None) -> Setup:
        """The setup of ``vllm_config`` on ``platform`` (default: this process's).

        ``flags`` default to every fusion flag that is set (not None): PassConfig's, and on
        vLLM 0.33 the SP flags of ``additional_config["vllm_fusion"]``.
        """
        from vllm_fusion import _kernels
        from vllm_fusion.config import parse_options
        from vllm_fusion.matrix import platform_id

        options = parse_options(vllm_config.additional_config)
        compilation = vllm_config.compilation_config
        if flags is None:
            values = compat.fusion_flag_values(vllm_config, FUSION_FLAGS, options)
            flags = {f: bool(v) for f, v in values.items() if v is not None}
        parallel = vllm_config.parallel_config
        model = vllm_config.model_config
        custom_ops = tuple(
            op for op in ("rms_norm", "quant_fp8", "silu_and_mul", "rotary_embedding")
            if _safe(lambda op=op: compilation.is_custom_op_enabled(op), False)
        )
        priority = _safe(lambda: vllm_config.kernel_config.ir_op_priority, None)
        platform = platform or platform_id()
        return cls(
            platform=platform,
            level=int(vllm_config.optimization_level),
            tp=int(parallel.tensor_parallel_size),
            pp=int(parallel.pipeline_parallel_size),
            dp=int(parallel.data_parallel_size),
            quant=scheme_of(model),
            dtype=str(getattr(model, "dtype", "bfloat16")).removeprefix("torch."),
            flags=dict(flags),
            custom_ops=custom_ops,
            rms_norm_priority=_safe(lambda: priority.rms_norm[0], "native"),
            fused_add_rms_norm_priority=_safe(lambda: priority.fused_add_rms_norm[0], "native"),
            graph_partition=bool(compilation.use_inductor_graph_partition),
            kv_update_split=_safe(lambda: user_splits_kv_update(compilation), False),
            hidden_size=_safe(model.get_hidden_size, None) if model is not None else None,
            has_flashinfer=probe_flashinfer(),
            has_aiter=probe_aiter(),
            aiter_ops=probe_aiter_ops() if platform_vendor(platform) == "rocm" else None,
            kernels_loaded=_kernels.load().loaded,
            package_enabled=options["enabled"],
            force_schemes=options["force_schemes"],
            scheme_overrides={k: tuple(v) for k, v in options["schemes"].items()},
            sp_min_token_num=compat.read_setting(vllm_config, "sp_min_token_num", options),
            allreduce_max_mib=_safe(
                lambda: compilation.pass_config.fi_allreduce_fusion_max_size_mb, None),
        )


KV_CACHE_UPDATE_OP = "vllm::unified_kv_cache_update"


def user_splits_kv_update(compilation) -> bool:
    """Whether splitting_ops (the user's, or vLLM's final list) take the KV-cache update out
    of the graph, without Inductor graph partition to keep it in."""
    ops = compilation.splitting_ops
    return (ops is not None and KV_CACHE_UPDATE_OP in ops
            and not compilation.use_inductor_graph_partition)


def _safe(fn, default):
    try:
        return fn()
    except Exception:
        return default


def scheme_of(model_config) -> str | None:
    """The scheme family of the model's linear layers; None when not recognised."""
    if model_config is None:
        return "unquantized"
    method = getattr(model_config, "quantization", None)
    if not method:
        return "unquantized"
    if _safe(model_config.is_nvfp4_quantized, False):
        return "nvfp4"
    if method == "fp8":
        hf = _safe(lambda: model_config.model_arch_config.quantization_config, None) or {}
        if hf.get("weight_block_size"):
            return "fp8-group"
        return "fp8-static" if hf.get("activation_scheme") == "static" else "fp8-per-token"
    return None


def probe_flashinfer() -> bool | None:
    """FlashInfer installed (vLLM's own probe: the package and its JIT toolchain)."""
    try:
        from vllm.utils.flashinfer import has_flashinfer
    except Exception:
        return None
    return _safe(has_flashinfer, None)


def probe_aiter() -> bool | None:
    """AITER usable by vLLM (installed, ROCm gfx9, VLLM_ROCM_USE_AITER=1)."""
    try:
        from vllm._aiter_ops import rocm_aiter_ops
    except Exception:
        return None
    # is_enabled() answers None (not False) where AITER is unsupported or not installed.
    return _safe(lambda: bool(rocm_aiter_ops.is_enabled()), None)


def probe_aiter_ops() -> tuple[str, ...]:
    """The AITER ops named in the matrix that this process has."""
    from vllm_fusion import aiter

    names = {op for cap in load_full_matrix().fusions.values()
             for row in cap.rocm.values() for op in row.all_aiter_ops()}
    return tuple(sorted(op for op in names if aiter.aiter_op(op) is not None))


@dataclass(frozen=True)
class Decision:
    flag: str
    # The flag's value after resolution: the fusion's pass is in vLLM's list.
    enabled: bool
    # "on": runs and fuses this setup's scheme; "idle": its pass runs but fuses nothing
    # of this scheme; "off": not run.
    status: str
    reason: str
    # Who runs it here: "vllm_fusion" or "vllm".
    implementation: str
    explicit: bool = False
    # Set when an explicit True was turned off (the text of the one warning).
    warning: str | None = None
    # Package fusions: scheme families its pass fuses.
    schemes: tuple[str, ...] = ()
    # What runs it, when enabled: "vllm_fusion" (this package's kernels), "vllm" (vLLM's own
    # pass) or "aiter" (vLLM's own AITER pass, on ROCm).
    route: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schemes"] = list(self.schemes)
        return d


_FALLBACK_TEXT = {"vllm_fusion": "this package's HIP kernel runs it",
                  "vllm": "vLLM's own pass runs it", "off": "nothing fuses it"}


def _aiter_missing(ops: tuple[str, ...], setup: Setup) -> str | None:
    """Why the AITER route cannot run ``ops`` here; None if it can."""
    if setup.has_aiter is False:
        return "AITER not enabled (amd-aiter installed and VLLM_ROCM_USE_AITER=1)"
    missing = [op for op in ops if setup.aiter_ops is not None and op not in setup.aiter_ops]
    return f"the installed AITER lacks {', '.join(missing)}" if missing else None


def rocm_route(cap: FusionCapability, setup: Setup) -> tuple[str, str] | None:
    """(route, why) from the matrix's ROCm row for this platform; None without a row.

    The AITER route is taken for the setup's scheme when AITER has a fused op for it and the
    ops are there; otherwise the row's fallback runs."""
    row = cap.rocm.get(setup.platform)
    if row is None:
        return None
    if row.route != "aiter":
        return row.route, row.reason
    ops = row.aiter_ops_for(setup.quant)
    why_not = (f"AITER has no fused op for {setup.quant}" if ops is None
               else _aiter_missing(ops, setup))
    if why_not is None:
        return "aiter", f"{row.reason} [AITER: {', '.join(ops)}]"
    return row.fallback, f"{why_not}: {_FALLBACK_TEXT[row.fallback]}"


def _gate(cap: FusionCapability, setup: Setup) -> str | None:
    """Why the platform or setup cannot run the fusion at all; None if it can."""
    vendor = setup.vendor
    route = rocm_route(cap, setup)
    if route is not None:
        if route[0] == "off":
            return route[1]
    elif not cap.supported_on(setup.platform):
        return cap.unsupported
    if setup.tp < cap.needs_tp:
        return f"needs TP>={cap.needs_tp} (TP={setup.tp})"
    if cap.needs_flashinfer and vendor == "cuda" and setup.has_flashinfer is False:
        return "needs FlashInfer, which is not installed"
    if cap.needs_aiter and route is None and vendor == "rocm" and setup.has_aiter is False:
        return "needs AITER (installed and VLLM_ROCM_USE_AITER=1)"
    if cap.dtypes and setup.dtype not in cap.dtypes:
        return f"model dtype {setup.dtype} not in {'/'.join(cap.dtypes)}"
    if cap.message_sizes and route is None and setup.allreduce_max_mib is None:
        measured = cap.message_sizes.get(setup.platform, {})
        if setup.tp not in measured:
            sizes = ", ".join(f"TP{tp}" for tp in sorted(measured)) or "none"
            return (f"no measured message-size threshold for TP={setup.tp} on "
                    f"{setup.platform} (measured: {sizes}); set "
                    "compilation_config.pass_config.fi_allreduce_fusion_max_size_mb to run it")
    if cap.needs_full_graph and cap.flag == "fuse_rope_kvcache" and setup.kv_update_split \
            and not setup.graph_partition:
        return (f"compilation_config.splitting_ops contains {KV_CACHE_UPDATE_OP}, so the "
                "KV-cache write runs outside the compiled graph; remove it from splitting_ops "
                "(or leave splitting_ops unset, or set use_inductor_graph_partition=True)")
    if cap.flag in _SP_FLAGS:
        reason = _sp_gate(setup)
        if reason is not None:
            return reason
    return _vllm_gate(cap.flag, setup) if cap.implementation == "vllm" else None


def _sp_gate(setup: Setup) -> str | None:
    """What sequence parallelism (and async TP, built on it) needs beyond the data's fields."""
    release = compat.release_for(setup.vllm)
    if not release.has_vllm_pass("enable_sp"):
        return (f"vLLM {release.version} has no enable_sp pass (removed in 0.33), and with it "
                "what SP needs from the model runner (token counts padded to a multiple of "
                "TP); vllm_fusion's SP pass runs on vLLM 0.26 for now")
    if setup.sp_min_token_num is None and setup.hidden_size is not None:
        threshold = load_matrix()["enable_sp"].sp_thresholds.get(setup.platform)
        if threshold is not None and setup.hidden_size < threshold.min_hidden:
            return (f"hidden size {setup.hidden_size} below the SP threshold "
                    f"{threshold.min_hidden} for {setup.platform}: VllmConfig disables SP "
                    "(set sp_min_token_num to force)")
    return None


def _vllm_gate(flag: str, setup: Setup) -> str | None:
    """Where vLLM 0.26 itself refuses a fusion that the data's fields don't express."""
    if flag == "fuse_allreduce_rms" and setup.vendor == "cuda" and setup.tp not in _FI_WORLD_SIZES:
        return f"FlashInfer's fused all-reduce takes TP in {_FI_WORLD_SIZES} (TP={setup.tp})"
    release = compat.release_for(setup.vllm)
    if not release.has_vllm_pass(flag):
        return (f"vLLM {release.version} has no {flag} pass (removed in 0.33) and "
                "vllm_fusion does not implement it")
    return None


def _vllm_predicate(flag: str, setup: Setup) -> str | None:
    """vLLM 0.26's level predicate beyond the gates: None when it holds, else why not."""
    return None


def _scheme_note(cap: FusionCapability, setup: Setup, fused: tuple[str, ...] | None):
    """(status, note) for the setup's scheme; ``fused`` is the package pass's scheme list."""
    scheme = setup.quant
    if scheme is None:
        return "on", "quantization scheme not recognised"
    verdict = cap.schemes.get(scheme)
    if verdict is None:
        return "on", ""
    if not verdict.supported_on(setup.platform):
        return ("idle" if cap.quant_only else "on"), f"{scheme} not fused: {verdict.reason}"
    if fused is not None and scheme not in fused:
        return "idle", (f"{scheme} left to Inductor ({verdict.measured}); "
                        "additional_config force_schemes or schemes fuses it")
    if fused is not None:
        return "on", f"{scheme} fused ({verdict.measured})"
    return "on", f"{scheme}: {verdict.reason}"


def package_schemes(cap: FusionCapability, setup: Setup) -> tuple[str, ...]:
    """Scheme families the package's pass fuses in this setup."""
    if cap.flag in setup.scheme_overrides:
        # Never a scheme the platform cannot run (NVFP4 off SM100).
        supported = cap.supported_schemes(setup.platform)
        return tuple(s for s in setup.scheme_overrides[cap.flag] if s in supported)
    if setup.force_schemes:
        return cap.supported_schemes(setup.platform)
    return cap.winning_schemes(setup.platform)


def resolve_fusion(flag: str, setup: Setup) -> Decision:
    cap = load_full_matrix().fusions[flag]
    explicit = setup.flags.get(flag)
    impl = cap.implementation
    owned = impl == "vllm_fusion"
    route = rocm_route(cap, setup)
    # The package's own kernels run it (not vLLM's pass, AITER's or not).
    uses_kernels = owned and (route is None or route[0] == "vllm_fusion")

    def off(reason: str, warning: str | None = None) -> Decision:
        return Decision(flag, False, "off", reason, impl, explicit is not None, warning)

    if explicit is False:
        where = (f"-cc.pass_config.{flag}=False"
                 if compat.release_for(setup.vllm).in_pass_config(flag)
                 else f'additional_config vllm_fusion.{flag}=false')
        return off(f"turned off explicitly ({where})")
    gate = _gate(cap, setup)
    if explicit is True:
        if gate is not None:
            return off(gate, f"{flag} is turned off on {setup.platform}: {gate}")
        if owned and not setup.package_enabled:
            return Decision(flag, True, "on", "turned on explicitly; additional_config "
                            "vllm_fusion.enabled=false: vLLM's pass runs", "vllm", True,
                            route="vllm")
        if uses_kernels and not setup.kernels_loaded:
            return Decision(flag, True, "on", "turned on explicitly; vllm_fusion kernels "
                            "not loaded: vLLM's pass runs", "vllm", True, route="vllm")
        reason = "turned on explicitly"
    else:
        if setup.level == 0:
            return off("-O0 compiles nothing: no fusion runs")
        if owned and not setup.package_enabled:
            return off("additional_config vllm_fusion.enabled=false: off by default")
        if not cap.default_on:
            return off(cap.default)
        if setup.level < cap.level:
            return off(f"off at -O{setup.level}; on by default from -O{cap.level}: {cap.default}")
        if gate is not None:
            return off(gate)
        if uses_kernels and not setup.kernels_loaded:
            return off("vllm_fusion kernels not loaded")
        if not owned and (why := _vllm_predicate(flag, setup)) is not None:
            return off(why)
        reason = f"on by default at -O{setup.level}: {cap.default}"
    if route is not None:
        reason = f"{reason}; ROCm: {route[1]}"
        if owned and route[0] != "vllm_fusion":
            # vLLM's own pass (AITER's, for the AITER route) runs it: delegated.
            return Decision(flag, True, "on", reason, "vllm", explicit is not None,
                            route=route[0])
    verdict = cap.schemes.get(setup.quant or "")
    if (owned and verdict is not None and verdict.vllm_fuses
            and setup.quant not in package_schemes(cap, setup)):
        # vLLM's pass has a fused kernel for this model's scheme and the package's is not chosen.
        return Decision(flag, True, "on", f"{reason}; {setup.quant}: {verdict.reason}", "vllm",
                        explicit is not None, route="vllm")
    fused = package_schemes(cap, setup) if owned else None
    status, note = _scheme_note(cap, setup, fused)
    if note:
        reason = f"{reason}; {note}"
    return Decision(flag, True, status, reason, impl, explicit is not None, None, fused or (),
                    route=route[0] if route is not None else impl)


def resolve_setup(setup: Setup) -> dict[str, Decision]:
    """Every fusion's decision, in vLLM's pass order."""
    return {flag: resolve_fusion(flag, setup) for flag in FUSION_FLAGS}


def resolve_levels(setup: Setup, levels=LEVELS) -> dict[int, dict[str, Decision]]:
    return {level: resolve_setup(replace(setup, level=level)) for level in levels}


def simulated_setup(platform: str, *, tp: int = 1, quant: str | None = "unquantized",
                    level: int = 2, **kwargs: Any) -> Setup:
    """A setup on a platform that is not this machine: FlashInfer (CUDA) and AITER (ROCm)
    are assumed installed unless ``has_flashinfer``/``has_aiter`` say otherwise."""
    vendor = platform_vendor(platform)
    kwargs.setdefault("has_flashinfer", vendor == "cuda")
    kwargs.setdefault("has_aiter", vendor == "rocm")
    return Setup(platform=platform, tp=tp, quant=quant, level=level, **kwargs)
