"""Typed service configuration from a TOML file plus environment variables.

Each service declares a frozen dataclass whose fields carry a docstring and
bounds in their metadata (see `setting`). `load_config` is the only place that
reads the environment: file values first, then `INFERMESH_<SERVICE>_<FIELD>`
overrides, then validation with errors that name the bad value.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of bounds."""


def setting(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A config field with its documentation and bounds."""
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _coerce(name: str, raw: Any, tp: Any) -> Any:
    """Turn a file or environment value into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        return _coerce(name, raw, non_none[0])
    if origin is list:
        (item,) = args
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list):
            raise ConfigError(f"{name}={raw!r}: must be a list")
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(raw)]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r}: must be a boolean (true/false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{name}={raw!r}: must be an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={raw!r}: must be an integer") from None
    if tp is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if tp is str:
        if not isinstance(raw, str | int | float):
            raise ConfigError(f"{name}={raw!r}: must be a string")
        return str(raw)
    raise ConfigError(f"{name}: unsupported config type {tp!r}")


def _validate(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if lo is not None and isinstance(v, int | float) and v < lo:
            raise ConfigError(f"{name}={v!r}: must be >= {lo}")
        if hi is not None and isinstance(v, int | float) and v > hi:
            raise ConfigError(f"{name}={v!r}: must be <= {hi}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{name}={v!r}: must be one of {', '.join(choices)}")


def load_config(
    cls: type[T],
    service: str,
    *,
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from (in rising precedence) defaults, file, environment, overrides.

    The file is `path`, else `$INFERMESH_<SERVICE>_CONFIG`, else `$INFERMESH_CONFIG`;
    in it, values live under a `[<service>]` table (or at the top level).
    """
    env = os.environ if env is None else env
    prefix = f"INFERMESH_{service.upper()}_"
    path = path or env.get(f"{prefix}CONFIG") or env.get("INFERMESH_CONFIG") or None
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
        section = data.get(service, data)
        if not isinstance(section, dict):
            raise ConfigError(f"config file {str(path)!r}: [{service}] must be a table")
        values.update(section)

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            raise ConfigError(f"{service}.{key}: unknown setting (known: {', '.join(sorted(fields))})")
    for name in fields:
        env_key = prefix + name.upper()
        if env_key in env:
            values[name] = env[env_key]
    if overrides:
        for key, value in overrides.items():
            if key not in fields:
                raise ConfigError(f"{service}.{key}: unknown setting")
            values[key] = value

    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        qualified = f"{service}.{name}"
        coerced = _coerce(qualified, value, hints[name])
        _validate(qualified, coerced, fields[name].metadata)
        kwargs[name] = coerced
    for name, f in fields.items():
        if name not in kwargs:
            default = f.default if f.default is not dataclasses.MISSING else None
            _validate(f"{service}.{name}", default, f.metadata)
    config = cls(**kwargs)
    check = getattr(config, "check", None)
    if callable(check):
        check()
    return config


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(name, doc, default) for each field: for READMEs and --help."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        out.append((f.name, f.metadata.get("doc", ""), default))
    return out


def metrics_port_setting() -> Any:
    """The `metrics_port` field every service config has."""
    return setting(
        0,
        "Port of the Prometheus /metrics HTTP endpoint, on the same host as the gRPC API; 0 = off.",
        min=0,
        max=65535,
    )


def otlp_endpoint_setting() -> Any:
    """The `otlp_endpoint` field every service config has."""
    return setting("", "host:port of an OTLP/gRPC collector that receives traces; empty = tracing off.")
