"""What the deploy files are checked against: the services' own config classes, read through
services.common.config (the same loader the services use)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.config import describe, load_config
from services.embedder.config import EmbedderConfig
from services.router.config import RouterConfig
from services.session.config import SessionConfig
from services.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
CONFIGS: dict[str, type] = {
    "router": RouterConfig,
    "session": SessionConfig,
    "worker": WorkerConfig,
    "embedder": EmbedderConfig,
}
# The module each service runs as, e.g. `python -m services.worker`.
MODULES = {f"services.{name}": name for name in CONFIGS}
_COMPOSE_DEFAULT = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def env_names() -> set[str]:
    """Every environment variable a service reads: INFERMESH_<SERVICE>_<SETTING>, plus the
    per-service config file variable."""
    names = set()
    for service, cls in CONFIGS.items():
        names.add(f"INFERMESH_{service.upper()}_CONFIG")
        names.update(f"INFERMESH_{service.upper()}_{name.upper()}" for name, _, _ in describe(cls))
    return names


def service_of_command(command: list[str]) -> str:
    """The service a `python -m services.<name>` command runs; fails for anything else."""
    assert command[:2] == ["python", "-m"], f"command {command} must be `python -m services.<name>`"
    module = command[2]
    assert module in MODULES, f"{module} is not one of {sorted(MODULES)}"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
    return MODULES[module]


def substitute(value: str) -> str:
    """A compose value with `${VAR:-default}` replaced by its default (as with an empty .env)."""
    return _COMPOSE_DEFAULT.sub(lambda m: m.group(2) or "", value)


def load(service: str, env: Mapping[str, str], path: Path | None = None) -> Any:
    """The service's config from this environment (and file), validated as at start."""
    return load_config(CONFIGS[service], service, path=path, env=env)


def field_names(service: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIGS[service])}
