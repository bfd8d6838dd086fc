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

from vllm_fusion.passes.registry import FUSION_FLAGS

ADDITIONAL_CONFIG_KEY = "vllm_fusion"

# option name -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "enabled": (bool, True, "false keeps vLLM's own passes for every fusion"),
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

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "fusions": dict(sorted(self.fusions.items()))}

    def digest(self) -> str:
        encoded = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()


def resolve(vllm_config) -> FusionSettings:
    """Settings for ``vllm_config``: vLLM's resolved flags plus the user's options."""
    options = parse_options(vllm_config.additional_config)
    pass_config = vllm_config.compilation_config.pass_config
    fusions = {flag: bool(getattr(pass_config, flag, False)) for flag in FUSION_FLAGS}
    return FusionSettings(enabled=options["enabled"], fusions=fusions)
