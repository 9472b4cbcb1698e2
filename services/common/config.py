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


def section(cls: type, doc: str) -> Any:
    """A config field that is a section: a frozen dataclass of settings of its own, e.g. the
    router's `quota`. Its settings keep flat names outside the code: `quota_tokens_per_minute`
    in the environment (INFERMESH_ROUTER_QUOTA_TOKENS_PER_MINUTE), in overrides and at the top of
    the service's TOML table, or `tokens_per_minute` under a `[router.quota]` table. A section's
    own `check()` runs once its settings are read, before the service's."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": cls})


@dataclasses.dataclass(frozen=True)
class _Flat:
    """One setting as the outside names it: `name` is `<section>_<field>` for a section's."""

    name: str
    section: str | None
    field: dataclasses.Field[Any]
    hint: Any


def _flat_settings(cls: type) -> dict[str, _Flat]:
    hints = typing.get_type_hints(cls)
    flat: dict[str, _Flat] = {}
    for f in dataclasses.fields(cls):
        inner = f.metadata.get("section")
        if inner is None:
            flat[f.name] = _Flat(f.name, None, f, hints[f.name])
            continue
        inner_hints = typing.get_type_hints(inner)
        for g in dataclasses.fields(inner):
            name = f"{f.name}_{g.name}"
            flat[name] = _Flat(name, f.name, g, inner_hints[g.name])
    return flat


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

    settings = _flat_settings(cls)
    sections = {f.name for f in dataclasses.fields(cls) if "section" in f.metadata}  # type: ignore[arg-type]
    values = _flatten(values, sections)
    for key in values:
        if key not in settings:
            raise ConfigError(f"{service}.{key}: unknown setting (known: {', '.join(sorted(settings))})")
    for name in settings:
        env_key = prefix + name.upper()
        if env_key in env:
            values[name] = env[env_key]
    if overrides:
        for key, value in _flatten(dict(overrides), sections).items():
            if key not in settings:
                raise ConfigError(f"{service}.{key}: unknown setting")
            values[key] = value

    kwargs: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, value in values.items():
        flat = settings[name]
        qualified = f"{service}.{name}"
        coerced = _coerce(qualified, value, flat.hint)
        _validate(qualified, coerced, flat.field.metadata)
        if flat.section is None:
            kwargs[name] = coerced
        else:
            inner[flat.section][flat.field.name] = coerced
    for name, flat in settings.items():
        if name not in values:
            default = flat.field.default if flat.field.default is not dataclasses.MISSING else None
            _validate(f"{service}.{name}", default, flat.field.metadata)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, given in inner.items():
        part = fields[name].metadata["section"](**given)
        _check(part)
        kwargs[name] = part
    config = cls(**kwargs)
    _check(config)
    return config


def _flatten(values: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    """`{"quota": {"tokens_per_minute": 5}}` (a TOML sub-table) as `{"quota_tokens_per_minute": 5}`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in sections and isinstance(value, dict):
            out.update({f"{key}_{name}": v for name, v in value.items()})
        else:
            out[key] = value
    return out


def _check(config: Any) -> None:
    check = getattr(config, "check", None)
    if callable(check):
        check()


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(name, doc, default) for each setting, a section's by its flat name: for READMEs and --help."""
    out = []
    for name, flat in _flat_settings(cls).items():
        f = flat.field
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        out.append((name, f.metadata.get("doc", ""), default))
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
