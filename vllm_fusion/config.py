"""Resolved settings of the package for one VllmConfig.

User options come from ``--additional-config '{"vllm_fusion": {...}}'``, which
vLLM pickles to every process and hashes into its compile-cache key. Flags vLLM
already has stay in vLLM's PassConfig (``-cc.pass_config.fuse_norm_quant=True``).
A pass never reads the environment or the device: it is handed these settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import load_matrix, platform_id
from vllm_fusion.passes.registry import FUSION_FLAGS

logger = init_logger(__name__)

ADDITIONAL_CONFIG_KEY = "vllm_fusion"

# option name -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "enabled": (bool, True, "false keeps vLLM's own passes for every fusion"),
    "force_schemes": (bool, False, "true fuses every supported quantization scheme, also "
                      "those the matrix measured slower than Inductor"),
}


class FusionConfigError(ValueError):
    """A bad ``additional_config["vllm_fusion"]``; fails vLLM's startup."""


def _allowed() -> str:
    return ", ".join(f"{name} ({typ.__name__})" for name, (typ, _, _) in OPTIONS.items())


def parse_options(additional_config: Any) -> dict[str, Any]:
    """Validate the user's options and fill in defaults."""
    raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {}) if isinstance(
        additional_config, dict
    ) else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FusionConfigError(
            f'additional_config["{ADDITIONAL_CONFIG_KEY}"] must be a JSON object, '
            f"got {type(raw).__name__}; allowed keys: {_allowed()}"
        )
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise FusionConfigError(
            f'unknown key(s) {", ".join(map(repr, unknown))} in '
            f'additional_config["{ADDITIONAL_CONFIG_KEY}"]; allowed keys: {_allowed()}'
        )
    options = {name: default for name, (_, default, _) in OPTIONS.items()}
    for name, value in raw.items():
        typ = OPTIONS[name][0]
        # bool is an int subclass: reject 1/0 where a bool is asked for.
        if typ is bool and not isinstance(value, bool) or not isinstance(value, typ):
            raise FusionConfigError(
                f'additional_config["{ADDITIONAL_CONFIG_KEY}"]["{name}"] must be '
                f"{typ.__name__}, got {value!r}"
            )
        options[name] = value
    return options


@dataclass(frozen=True)
class FusionSettings:
    enabled: bool
    # fusion flag -> whether it runs in this process's compile
    fusions: dict[str, bool] = field(default_factory=dict)
    platform: str = "unknown"
    # fusion flag -> (min, max) num_tokens where its kernel runs, from the matrix
    token_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # fusion flag -> quantization scheme families it fuses ("fp8-static", "fp8-group", ...)
    schemes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "fusions": dict(sorted(self.fusions.items())),
            "platform": self.platform,
            "token_ranges": {k: list(v) for k, v in sorted(self.token_ranges.items())},
            "schemes": {k: list(v) for k, v in sorted(self.schemes.items())},
        }

    def fuses_scheme(self, flag: str, family: str) -> bool:
        return family in self.schemes.get(flag, ())

    def digest(self) -> str:
        encoded = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()


def resolve(vllm_config) -> FusionSettings:
    """Settings for ``vllm_config`` on this process's platform.

    A fusion runs when vLLM's flag says so: the user's explicit value, or the
    package's level default (``autoconfig``) where the user left it unset. A
    flag set on a platform the matrix rules out is turned off with a warning.
    """
    options = parse_options(vllm_config.additional_config)
    pass_config = vllm_config.compilation_config.pass_config
    matrix = load_matrix()
    platform = platform_id()
    fusions: dict[str, bool] = {}
    token_ranges: dict[str, tuple[int, int]] = {}
    schemes: dict[str, tuple[str, ...]] = {}
    for flag in FUSION_FLAGS:
        on = bool(getattr(pass_config, flag, False))
        capability = matrix.get(flag)
        if capability is not None:
            if on and not capability.supported_on(platform):
                logger.warning_once(
                    "vllm_fusion: %s is turned off on %s: %s", flag, platform,
                    capability.unsupported,
                )
                on = False
            tokens = capability.token_range(platform)
            if tokens is not None:
                token_ranges[flag] = (tokens.min, tokens.max)
            if capability.schemes:
                schemes[flag] = (
                    tuple(capability.schemes) if options["force_schemes"]
                    else capability.winning_schemes(platform)
                )
        fusions[flag] = on
    return FusionSettings(options["enabled"], fusions, platform, token_ranges, schemes)


def autoconfig(flag: str):
    """vLLM optimization-level default for ``flag``: the matrix decides.

    Installed into vLLM's ``OPTIMIZATION_LEVEL_TO_CONFIG``; vLLM calls it only
    when the user left the flag unset, so an explicit value always wins.
    """

    def default(vllm_config) -> bool:
        from vllm_fusion import _kernels

        capability = load_matrix()[flag]
        return (
            int(vllm_config.optimization_level) >= capability.level
            and capability.supported_on(platform_id())
            # Without the kernels vLLM's own pass would run instead.
            and _kernels.load().loaded
            and parse_options(vllm_config.additional_config)["enabled"]
        )

    default.__qualname__ = f"vllm_fusion_autoconfig_{flag}"
    return default
