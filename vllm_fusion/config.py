"""Resolved settings of the package for one VllmConfig.

User options come from ``--additional-config '{"vllm_fusion": {...}}'``, which
vLLM pickles to every process and hashes into its compile-cache key. Flags vLLM
already has stay in vLLM's PassConfig (``-cc.pass_config.fuse_norm_quant=True``);
the sequence-parallelism settings vLLM 0.33 removed from it (``enable_sp``,
``fuse_gemm_comms``, ``sp_min_token_num``) are options here on 0.33 only
(``vllm_fusion.compat``).
A pass never reads the environment or the device: it is handed these settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_fusion import compat
from vllm_fusion.logger import init_logger
from vllm_fusion.matrix import load_matrix
from vllm_fusion.passes.registry import FUSION_FLAGS

logger = init_logger(__name__)

ADDITIONAL_CONFIG_KEY = "vllm_fusion"

# option name -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "enabled": (bool, True, "false keeps vLLM's own passes for every fusion"),
    "force_schemes": (bool, False, "true fuses every supported quantization scheme, also "
                      "those the matrix measured slower than Inductor"),
    "schemes": (dict, {}, "per fusion of the package, the scheme families to fuse, "
                "overriding the matrix verdicts and force_schemes, e.g. "
                '{"fuse_norm_quant": ["fp8-static", "fp8-group"]}'),
    "token_range": (dict, {}, "per fusion of the package, [min, max] num_tokens of the "
                    "compile ranges where its pass runs, overriding the matrix, e.g. "
                    '{"fuse_act_quant": [1, 8192]}'),
}

# The settings vLLM 0.33 dropped from PassConfig: options where the installed vLLM lacks them.
# None: unset (the fusion's level default, vLLM 0.26's size threshold).
SP_OPTIONS: dict[str, tuple[type, Any, str]] = {
    name: (typ, None, f"{meaning} (vLLM 0.26: pass_config.{name})")
    for name, (typ, meaning) in compat.SP_SETTINGS.items()
}

_TYPE_NAMES = {bool: "bool", dict: "object", int: "int", str: "string", list: "list"}


class FusionConfigError(ValueError):
    """A bad ``additional_config["vllm_fusion"]``; fails vLLM's startup."""


def available_options() -> dict[str, tuple[type, Any, str]]:
    """The options valid with the installed vLLM: ``OPTIONS`` plus the SP settings where
    its PassConfig lacks them."""
    moved = compat.release().additional_config_settings
    return {**OPTIONS, **{name: SP_OPTIONS[name] for name in moved}}


def _allowed() -> str:
    return ", ".join(f"{name} ({_TYPE_NAMES.get(typ, typ.__name__)})"
                     for name, (typ, _, _) in available_options().items())


def _owned_flags() -> tuple[str, ...]:
    from vllm_fusion.passes.registry import FUSIONS

    return tuple(f.flag for f in FUSIONS if f.package_pass is not None)


def _key(*path: str) -> str:
    return f'additional_config["{ADDITIONAL_CONFIG_KEY}"]' + "".join(f'["{p}"]' for p in path)


def _check_per_fusion(name: str, value: dict) -> None:
    owned = _owned_flags()
    for flag in value:
        if flag not in owned:
            raise FusionConfigError(
                f"unknown fusion {flag!r} in {_key(name)}; allowed: {', '.join(owned)}"
            )


def _check_schemes(value: dict) -> dict[str, list[str]]:
    _check_per_fusion("schemes", value)
    matrix = load_matrix()
    for flag, families in value.items():
        allowed = tuple(n for n, v in matrix[flag].schemes.items() if v.supported)
        if not isinstance(families, list) or any(f not in allowed for f in families):
            raise FusionConfigError(
                f"{_key('schemes', flag)} must be a list of scheme families from "
                f"{', '.join(allowed)}; got {families!r}"
            )
    return value


def _check_token_range(value: dict) -> dict[str, list[int]]:
    _check_per_fusion("token_range", value)
    for flag, bounds in value.items():
        ok = (isinstance(bounds, list) and len(bounds) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
              and 1 <= bounds[0] <= bounds[1])
        if not ok:
            raise FusionConfigError(
                f"{_key('token_range', flag)} must be [min, max] with integers "
                f"1 <= min <= max; got {bounds!r}"
            )
    return value


def _check_sp_min_token_num(value: int) -> int:
    if value < 1:
        raise FusionConfigError(f"{_key('sp_min_token_num')} must be an integer >= 1; "
                                f"got {value!r}")
    return value


_CHECKS = {"schemes": _check_schemes, "token_range": _check_token_range,
           "sp_min_token_num": _check_sp_min_token_num}


def _reject_pass_config_settings(raw: dict) -> None:
    """An SP setting in additional_config where vLLM's PassConfig still has it (0.26)."""
    misplaced = sorted(name for name in raw
                       if name in SP_OPTIONS and compat.release().in_pass_config(name))
    if misplaced:
        name = misplaced[0]
        raise FusionConfigError(
            f"{_key(name)} is not an option with vLLM {compat.release().version}: "
            f"{name} is vLLM's own setting there (-cc.pass_config.{name}=...); "
            f"allowed keys: {_allowed()}"
        )


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
    _reject_pass_config_settings(raw)
    available = available_options()
    unknown = sorted(set(raw) - set(available))
    if unknown:
        raise FusionConfigError(
            f'unknown key(s) {", ".join(map(repr, unknown))} in '
            f'additional_config["{ADDITIONAL_CONFIG_KEY}"]; allowed keys: {_allowed()}'
        )
    options = {name: default for name, (_, default, _) in available.items()}
    for name, value in raw.items():
        typ = available[name][0]
        if value is None and available[name][1] is None:
            continue  # explicitly unset
        # bool is an int subclass: reject 1/0 where a bool is asked for, and True for an int.
        if (typ is bool and not isinstance(value, bool) or not isinstance(value, typ)
                or typ is int and isinstance(value, bool)):
            raise FusionConfigError(
                f'additional_config["{ADDITIONAL_CONFIG_KEY}"]["{name}"] must be '
                f"{_TYPE_NAMES.get(typ, typ.__name__)}, got {value!r}"
            )
        options[name] = _CHECKS[name](value) if name in _CHECKS else value
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
    # Package fusions left to vLLM's own pass here (e.g. a scheme only vLLM has a kernel for)
    delegated: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "fusions": dict(sorted(self.fusions.items())),
            "platform": self.platform,
            "token_ranges": {k: list(v) for k, v in sorted(self.token_ranges.items())},
            "schemes": {k: list(v) for k, v in sorted(self.schemes.items())},
            "delegated": list(self.delegated),
        }

    def fuses_scheme(self, flag: str, family: str) -> bool:
        return family in self.schemes.get(flag, ())

    def digest(self) -> str:
        encoded = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()


def _log_delegation(flag: str, reason: str) -> None:
    from vllm_fusion import _kernels

    kernels = _kernels.load()
    if kernels.loaded:  # a scheme only vLLM has a kernel for: expected
        logger.info_once("vllm_fusion: %s runs vLLM's own pass: %s", flag, reason)
    else:
        logger.warning_once(
            "vllm_fusion: %s runs vLLM's own pass: %s", flag, kernels.describe()
        )


def warn_decision(decision) -> None:
    """The one warning of an explicit True the setup cannot run (once per process)."""
    if decision.warning:
        logger.warning_once("vllm_fusion: %s", decision.warning)


def resolve(vllm_config) -> FusionSettings:
    """Settings for ``vllm_config`` on this process's platform.

    The flags in vLLM's PassConfig are final here (explicit, or the level default
    computed by ``autoconfig``/vLLM's predicates), so each is treated as the
    user's choice and handed to the resolver: a package fusion the platform or
    setup cannot run is turned off with one warning. vLLM's own fusions keep
    their flag as it is: the package never changes what vLLM does with them.
    """
    from vllm_fusion.resolver import Setup, package_schemes, resolve_fusion

    options = parse_options(vllm_config.additional_config)
    matrix = load_matrix()
    setup = Setup.from_vllm_config(vllm_config)
    platform = setup.platform
    fusions: dict[str, bool] = {}
    token_ranges: dict[str, tuple[int, int]] = {}
    schemes: dict[str, tuple[str, ...]] = {}
    delegated: list[str] = []
    values = compat.fusion_flag_values(vllm_config, FUSION_FLAGS, options)
    for flag in FUSION_FLAGS:
        on = bool(values[flag])
        capability = matrix.get(flag)
        if capability is not None and capability.implementation == "vllm_fusion":
            decision = resolve_fusion(flag, setup)
            warn_decision(decision)
            on = decision.enabled
            if on and decision.implementation == "vllm":
                delegated.append(flag)
                _log_delegation(flag, decision.reason)
            override = options["token_range"].get(flag)
            tokens = capability.token_range(platform)
            if override is not None:
                token_ranges[flag] = (override[0], override[1])
            elif tokens is not None:
                token_ranges[flag] = (tokens.min, tokens.max)
            if capability.schemes:
                schemes[flag] = package_schemes(capability, setup)
        fusions[flag] = on
    return FusionSettings(
        options["enabled"], fusions, platform, token_ranges, schemes, tuple(delegated)
    )


def autoconfig(flag: str):
    """vLLM optimization-level default for ``flag``: the matrix decides.

    Installed into vLLM's ``OPTIMIZATION_LEVEL_TO_CONFIG``; vLLM calls it only
    when the user left the flag unset, so an explicit value always wins.
    """

    def default(vllm_config) -> bool:
        from vllm_fusion.resolver import Setup, resolve_fusion

        # The decision of an unset flag (the others do not matter to it).
        setup = Setup.from_vllm_config(vllm_config, flags={})
        return resolve_fusion(flag, setup).enabled

    default.__qualname__ = f"vllm_fusion_autoconfig_{flag}"
    return default
