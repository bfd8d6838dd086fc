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


@dataclass(frozen=True)
class TokenRange:
    min: int
    max: int
    measured: str = ""

    def covers(self, start: int, end: int) -> bool:
        return self.min <= start and end <= self.max


@dataclass(frozen=True)
class SchemeVerdict:
    """Where the fused kernel beats Inductor for one quantization scheme family."""

    platforms: tuple[str, ...]
    measured: str


@dataclass(frozen=True)
class FusionCapability:
    flag: str
    platforms: tuple[str, ...]
    unsupported: str
    level: int
    tokens: dict[str, TokenRange] = field(default_factory=dict)
    schemes: dict[str, SchemeVerdict] = field(default_factory=dict)

    def supported_on(self, platform_id: str) -> bool:
        return platform_id in self.platforms

    def winning_schemes(self, platform_id: str) -> tuple[str, ...]:
        return tuple(name for name, v in self.schemes.items() if platform_id in v.platforms)

    def token_range(self, platform_id: str) -> TokenRange | None:
        return self.tokens.get(platform_id)


@functools.cache
def load_matrix() -> dict[str, FusionCapability]:
    text = resources.files("vllm_fusion.data").joinpath("matrix.toml").read_text()
    raw = tomllib.loads(text)["fusions"]
    return {
        flag: FusionCapability(
            flag=flag,
            platforms=tuple(entry["platforms"]),
            unsupported=entry["unsupported"],
            level=int(entry["level"]),
            tokens={p: TokenRange(**r) for p, r in entry.get("tokens", {}).items()},
            schemes={
                name: SchemeVerdict(tuple(v["platforms"]), v["measured"])
                for name, v in entry.get("schemes", {}).items()
            },
        )
        for flag, entry in raw.items()
    }


def platform_id(platform=None) -> str:
    """``sm90``, ``gfx942``, ...; ``cpu``/``unknown`` elsewhere. Reads vLLM's current platform."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_rocm():
        import torch

        try:
            arch = torch.cuda.get_device_properties(0).gcnArchName
        except (RuntimeError, AssertionError):
            return "rocm"
        return arch.split(":")[0]
    if platform.is_cuda():
        capability = platform.get_device_capability()
        if capability is None:
            return "unknown"
        major, minor = capability
        # Architecture families share kernels and measurements.
        return {10: "sm100", 11: "sm100", 12: "sm120"}.get(major, f"sm{major}{minor}")
    return "cpu" if platform.is_cpu() else "unknown"
