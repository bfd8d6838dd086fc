"""The capability matrix (``data/matrix.toml``) and the platform probe."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

IMPLEMENTATIONS = ("vllm_fusion", "vllm")
# What runs a fusion on an AMD GPU: this package's HIP kernel, vLLM's own AITER pass (the package
# delegates to it), vLLM's own non-AITER pass, or nothing.
ROCM_ROUTES = ("vllm_fusion", "aiter", "vllm", "off")
# Key of RocmRow.aiter_ops for an AITER op that serves every scheme.
ALL_SCHEMES = "all"


@dataclass(frozen=True)
class TokenRange:
    min: int
    max: int
    measured: str = ""


@dataclass(frozen=True)
class AllReduceSizes:
    """Where a fused all-reduce runs for one (platform, TP size): messages from ``min_bytes`` up
    to ``max_bytes`` (smaller ones are faster unfused), the one-shot kernel up to
    ``one_shot_bytes`` (its push variant up to ``push_bytes``) and the two-shot kernel above."""

    max_bytes: int
    one_shot_bytes: int
    measured: str = ""
    min_bytes: int = 0
    push_bytes: int = 0


@dataclass(frozen=True)
class SpThreshold:
    """Where sequence parallelism starts on one platform: for models with hidden >= min_hidden,
    from ``per_gpu_bytes`` x TP bytes of activations per all-reduce."""

    min_hidden: int
    per_gpu_bytes: int
    measured: str = ""
    # What turning SP on costs the batches below the threshold (measured), or "".
    decode_cost: str = ""


@dataclass(frozen=True)
class BackendMeasurement:
    """What fusing one attention backend measured end to end on one platform."""

    wins: bool
    text: str


@dataclass(frozen=True)
class AttentionBackendRow:
    """One vLLM attention backend for an attention fusion: whether its kernel can take the
    fused (quantized) output, why, and per platform what fusing it measured."""

    writes_fp8_output: bool
    reason: str
    measured: dict[str, BackendMeasurement] = field(default_factory=dict)

    def measured_loss(self, platform_id: str) -> str | None:
        """The measurement showing the fusion slower on this platform; None otherwise."""
        m = self.measured.get(platform_id)
        return m.text if m is not None and not m.wins else None


@dataclass(frozen=True)
class SchemeVerdict:
    """One quantization scheme family of a fusion: whether it is fused, and (for the
    package's kernels) where the fused kernel beats Inductor."""

    # Where the fused kernel beats what runs otherwise (measured verdict).
    platforms: tuple[str, ...]
    measured: str
    # True, False, or the platform ids where the scheme is fused at all.
    supported: bool | tuple[str, ...] = True
    reason: str = ""
    # Package fusions: vLLM's own pass fuses this scheme, so it keeps the fusion for it.
    vllm_fuses: bool = False

    def supported_on(self, platform_id: str) -> bool:
        if isinstance(self.supported, bool):
            return self.supported
        return platform_id in self.supported


@dataclass(frozen=True)
class RocmRow:
    """What runs a fusion on one AMD GPU, and why."""

    route: str
    reason: str
    # route "aiter": scheme (or ALL_SCHEMES) -> the AITER ops vLLM's AITER pass calls for it.
    aiter_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # route "aiter": what runs for the schemes AITER has no fused op for, and without AITER.
    fallback: str = "off"

    def aiter_ops_for(self, scheme: str | None) -> tuple[str, ...] | None:
        """The AITER ops the AITER route needs for ``scheme``; None: no AITER route for it."""
        if self.route != "aiter":
            return None
        if ALL_SCHEMES in self.aiter_ops:
            return self.aiter_ops[ALL_SCHEMES]
        return self.aiter_ops.get(scheme or "")

    def all_aiter_ops(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(op for ops in self.aiter_ops.values() for op in ops))


@dataclass(frozen=True)
class FusionCapability:
    flag: str
    platforms: tuple[str, ...]
    unsupported: str
    level: int
    tokens: dict[str, TokenRange] = field(default_factory=dict)
    schemes: dict[str, SchemeVerdict] = field(default_factory=dict)
    implementation: str = "vllm_fusion"
    fuses: str = ""
    default_on: bool = True
    default: str = ""
    needs_full_graph: bool = False
    needs_tp: int = 1
    needs_flashinfer: bool = False
    needs_aiter: bool = False
    dtypes: tuple[str, ...] = ()
    quant_only: bool = False
    # ROCm platform id -> what runs there
    rocm: dict[str, RocmRow] = field(default_factory=dict)
    # All-reduce fusions: platform id -> TP size -> message sizes where the fused op runs
    message_sizes: dict[str, dict[int, AllReduceSizes]] = field(default_factory=dict)
    # Sequence parallelism: platform id -> where it starts
    sp_thresholds: dict[str, SpThreshold] = field(default_factory=dict)
    # Attention fusions: vLLM backend name -> what that backend can do and measured
    backends: dict[str, AttentionBackendRow] = field(default_factory=dict)

    def supported_on(self, platform_id: str) -> bool:
        return platform_id in self.platforms

    def winning_schemes(self, platform_id: str) -> tuple[str, ...]:
        return tuple(name for name, v in self.schemes.items() if platform_id in v.platforms)

    def supported_schemes(self, platform_id: str) -> tuple[str, ...]:
        return tuple(name for name, v in self.schemes.items() if v.supported_on(platform_id))

    def token_range(self, platform_id: str) -> TokenRange | None:
        return self.tokens.get(platform_id)


@dataclass(frozen=True)
class Platform:
    id: str
    vendor: str  # "cuda" | "rocm"
    label: str


@dataclass(frozen=True)
class Matrix:
    platforms: dict[str, Platform]
    schemes: dict[str, str]  # scheme id -> label
    fusions: dict[str, FusionCapability]


class MatrixError(ValueError):
    """matrix.toml does not follow its schema."""


def _supported(value, where: str):
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise MatrixError(f"{where}.supported must be a bool or a list of platform ids, got {value!r}")


def _rocm_row(raw: dict, where: str, schemes: dict) -> RocmRow:
    route, fallback = raw.get("route"), raw.get("fallback", "off")
    if route not in ROCM_ROUTES:
        raise MatrixError(f"{where}.route must be one of {ROCM_ROUTES}, got {route!r}")
    if fallback not in ROCM_ROUTES or fallback == "aiter":
        raise MatrixError(f"{where}.fallback must be vllm_fusion, vllm or off, got {fallback!r}")
    aiter_ops = {k: tuple(v) for k, v in raw.get("aiter_ops", {}).items()}
    if (route == "aiter") != bool(aiter_ops):
        raise MatrixError(f"{where}: aiter_ops is required with route 'aiter' and only there")
    for key in aiter_ops:
        if key != ALL_SCHEMES and schemes and key not in schemes:
            raise MatrixError(f"{where}.aiter_ops: unknown scheme {key!r}")
    if not raw.get("reason"):
        raise MatrixError(f"{where}.reason is required")
    return RocmRow(route, raw["reason"], aiter_ops, fallback)


def _message_sizes(raw: dict, where: str) -> dict[str, dict[int, AllReduceSizes]]:
    """``[<fusion>.message_sizes.<platform>]``: ``tp<N> = {min_mib, max_mib, one_shot_mib,
    push_mib}`` rows (push_mib optional, at most one_shot_mib) and the ``measured`` text they
    come from (the table's, or a row's own ``measured``)."""
    tables = {}
    for pid, table in raw.items():
        measured = table.get("measured", "")
        sizes = {}
        for key, row in table.items():
            if key == "measured":
                continue
            if not key.startswith("tp") or not key[2:].isdigit():
                raise MatrixError(f"{where}.{pid}: keys are tp<N> or measured, got {key!r}")
            max_bytes = int(float(row["max_mib"]) * 2**20)
            one_shot = min(int(float(row["one_shot_mib"]) * 2**20), max_bytes)
            min_bytes = int(float(row.get("min_mib", 0)) * 2**20)
            if min_bytes > max_bytes:
                raise MatrixError(f"{where}.{pid}.{key}: min_mib above max_mib")
            push = int(float(row.get("push_mib", 0)) * 2**20)
            if push > one_shot:
                raise MatrixError(f"{where}.{pid}.{key}: push_mib above one_shot_mib (push is a "
                                  "one-shot variant)")
            sizes[int(key[2:])] = AllReduceSizes(max_bytes, one_shot,
                                                 row.get("measured", measured), min_bytes, push)
        tables[pid] = sizes
    return tables


def _sp_thresholds(raw: dict, where: str, platforms: dict) -> dict[str, SpThreshold]:
    """``[<fusion>.sp_thresholds.<platform>]``: min_hidden, per_gpu_mib, measured, decode_cost."""
    rows = {}
    for pid, row in raw.items():
        if platforms and pid not in platforms:
            raise MatrixError(f"{where}: unknown platform {pid!r}")
        try:
            min_hidden, per_gpu_mib = int(row["min_hidden"]), float(row["per_gpu_mib"])
        except (KeyError, TypeError, ValueError) as e:
            raise MatrixError(f"{where}.{pid}: min_hidden and per_gpu_mib (numbers) are "
                              f"required ({e})") from None
        if min_hidden < 0 or per_gpu_mib <= 0:
            raise MatrixError(f"{where}.{pid}: min_hidden >= 0 and per_gpu_mib > 0")
        decode_cost = row.get("decode_cost", "")
        if not isinstance(decode_cost, str):
            raise MatrixError(f"{where}.{pid}.decode_cost: a string (the measurement), got "
                              f"{decode_cost!r}")
        rows[pid] = SpThreshold(min_hidden, int(per_gpu_mib * 2**20), row.get("measured", ""),
                                decode_cost)
    return rows


def _backends(raw: dict, where: str, platforms: dict) -> dict[str, AttentionBackendRow]:
    """``[<fusion>.backends.<BACKEND>]``: writes_fp8_output, reason, measured.<platform>."""
    rows = {}
    for name, row in raw.items():
        if not isinstance(row.get("writes_fp8_output"), bool) or not row.get("reason"):
            raise MatrixError(f"{where}.{name}: writes_fp8_output (true/false) and reason "
                              "are required")
        measured = {}
        for pid, m in row.get("measured", {}).items():
            if platforms and pid not in platforms:
                raise MatrixError(f"{where}.{name}.measured: unknown platform {pid!r}")
            if not isinstance(m.get("wins"), bool) or not m.get("text"):
                raise MatrixError(f"{where}.{name}.measured.{pid}: wins (true/false) and text "
                                  "are required")
            measured[pid] = BackendMeasurement(m["wins"], m["text"])
        rows[name] = AttentionBackendRow(row["writes_fp8_output"], row["reason"], measured)
    return rows


def _parse(raw: dict) -> Matrix:
    platforms = {
        pid: Platform(pid, entry["vendor"], entry["label"])
        for pid, entry in raw.get("platforms", {}).items()
    }
    schemes = {sid: entry["label"] for sid, entry in raw.get("schemes", {}).items()}
    fusions = {}
    for flag, entry in raw["fusions"].items():
        where = f"fusions.{flag}"
        implementation = entry.get("implementation", "vllm_fusion")
        if implementation not in IMPLEMENTATIONS:
            raise MatrixError(f"{where}.implementation must be one of {IMPLEMENTATIONS}")
        for pid in entry["platforms"]:
            if platforms and pid not in platforms:
                raise MatrixError(f"{where}.platforms: unknown platform {pid!r}")
        verdicts = {}
        for name, v in entry.get("schemes", {}).items():
            if schemes and name not in schemes:
                raise MatrixError(f"{where}.schemes: unknown scheme {name!r}")
            verdicts[name] = SchemeVerdict(
                tuple(v.get("platforms", ())), v.get("measured", "not measured"),
                _supported(v.get("supported", True), f"{where}.schemes.{name}"),
                v.get("reason", ""),
                bool(v.get("vllm_fuses", False)),
            )
        rocm = {}
        for pid, row in entry.get("rocm", {}).items():
            if platforms and platforms.get(pid, Platform(pid, "", "")).vendor != "rocm":
                raise MatrixError(f"{where}.rocm: {pid!r} is not a ROCm platform")
            rocm[pid] = _rocm_row(row, f"{where}.rocm.{pid}", schemes)
            runs_there = rocm[pid].route != "off"
            if runs_there != (pid in entry["platforms"]):
                raise MatrixError(f"{where}.rocm.{pid}: route {rocm[pid].route!r} contradicts "
                                  f"{where}.platforms")
            if "vllm_fusion" in (rocm[pid].route, rocm[pid].fallback) and \
                    implementation != "vllm_fusion":
                raise MatrixError(f"{where}.rocm.{pid}: no vllm_fusion kernel for this fusion")
        fusions[flag] = FusionCapability(
            flag=flag,
            platforms=tuple(entry["platforms"]),
            unsupported=entry["unsupported"],
            level=int(entry["level"]),
            tokens={p: TokenRange(**r) for p, r in entry.get("tokens", {}).items()},
            schemes=verdicts,
            implementation=implementation,
            fuses=entry.get("fuses", ""),
            default_on=bool(entry.get("default_on", True)),
            default=entry.get("default", ""),
            needs_full_graph=bool(entry.get("needs_full_graph", False)),
            needs_tp=int(entry.get("needs_tp", 1)),
            needs_flashinfer=bool(entry.get("needs_flashinfer", False)),
            needs_aiter=bool(entry.get("needs_aiter", False)),
            dtypes=tuple(entry.get("dtypes", ())),
            quant_only=bool(entry.get("quant_only", False)),
            rocm=rocm,
            message_sizes=_message_sizes(entry.get("message_sizes", {}),
                                         f"{where}.message_sizes"),
            backends=_backends(entry.get("backends", {}), f"{where}.backends", platforms),
            sp_thresholds=_sp_thresholds(entry.get("sp_thresholds", {}),
                                         f"{where}.sp_thresholds", platforms),
        )
    return Matrix(platforms, schemes, fusions)


@functools.cache
def load_full_matrix() -> Matrix:
    text = resources.files("vllm_fusion.data").joinpath("matrix.toml").read_text()
    return _parse(tomllib.loads(text))


def load_matrix() -> dict[str, FusionCapability]:
    """fusion flag -> capability."""
    return load_full_matrix().fusions


def platform_vendor(platform_id: str) -> str:
    """"cuda", "rocm", or the id itself ("cpu", "unknown") for anything else."""
    known = load_full_matrix().platforms.get(platform_id)
    if known is not None:
        return known.vendor
    if platform_id.startswith("sm"):
        return "cuda"
    if platform_id.startswith("gfx") or platform_id == "rocm":
        return "rocm"
    return platform_id


def platform_id(platform=None) -> str:
    """``sm90``, ``gfx942``, ...; ``cpu``/``unknown`` elsewhere. Reads vLLM's current platform."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_rocm():
        return _gcn_arch()
    if platform.is_cuda():
        capability = platform.get_device_capability()
        if capability is None:
            return "unknown"
        major, minor = capability
        # Architecture families share kernels and measurements.
        return {10: "sm100", 11: "sm100", 12: "sm120"}.get(major, f"sm{major}{minor}")
    return "cpu" if platform.is_cpu() else "unknown"


def _gcn_arch() -> str:
    """``gfx942`` (target features dropped): vLLM's own reading, which asks amdsmi and so
    initialises no GPU, else torch's; ``rocm`` when neither knows."""
    try:
        from vllm.platforms import rocm

        arch = rocm._GCN_ARCH
    except Exception:
        import torch

        try:
            arch = torch.cuda.get_device_properties(0).gcnArchName
        except (RuntimeError, AssertionError):
            return "rocm"
    return arch.split(":")[0] or "rocm"
