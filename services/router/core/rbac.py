"""Roles: which RPCs, models and priority classes an API key may use. Pure decisions.

A role is written as one line of config, e.g.
`analyst:rpcs=inference,sessions:models=smollm2-135m-instruct:priorities=standard,batch`
(`*` means all; left out means all as well). The RPC groups are below; `admin` covers the
Admin service (keys, drain) and cluster status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALL = "*"

# Full method name → group. Methods not listed belong to no group and are refused.
_INFERENCE = "/infermesh.router.v1.Inference/"
_ADMIN = "/infermesh.router.v1.Admin/"
METHOD_GROUPS: dict[str, str] = {
    **{_INFERENCE + m: "inference" for m in ("Generate", "Embed", "ListModels")},
    **{
        _INFERENCE + m: "sessions"
        for m in (
            "CreateSession",
            "GetSession",
            "GetHistory",
            "AppendMessages",
            "DeleteSession",
            "ExportUserData",
        )
    },
    **{
        _INFERENCE + m: "batches"
        for m in ("SubmitBatch", "GetBatch", "ListBatches", "GetBatchResults", "CancelBatch")
    },
    _INFERENCE + "GetClusterStatus": "status",
    **{_ADMIN + m: "admin" for m in ("CreateApiKey", "RevokeApiKey", "ListApiKeys", "DrainEndpoint")},
}
GROUPS = frozenset(METHOD_GROUPS.values())
PRIORITIES = ("critical", "interactive", "standard", "batch")


class RoleError(ValueError):
    """A role definition that cannot be parsed."""


@dataclass(frozen=True)
class AccessRole:
    name: str
    groups: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    priorities: frozenset[str] = frozenset(PRIORITIES)

    def denies_method(self, method: str) -> str | None:
        """Why `method` is refused, or None when allowed."""
        group = METHOD_GROUPS.get(method)
        if group is None:
            return f"method {method} is not open to API keys"
        if group not in self.groups:
            return f"role {self.name!r} may not call {method.rsplit('/', 1)[-1]} (needs {group!r} rights)"
        return None

    def denies_model(self, model: str) -> str | None:
        if self.models is None or model in self.models:
            return None
        return f"role {self.name!r} may not use model {model!r}"

    def denies_priority(self, priority: str) -> str | None:
        if priority.lower() in self.priorities:
            return None
        return f"role {self.name!r} may not use priority {priority.upper()}"


BUILTIN_ROLES: dict[str, AccessRole] = {
    "admin": AccessRole("admin", GROUPS),
    # Cluster status shows every endpoint's address and load: operators' business.
    "user": AccessRole(
        "user",
        frozenset({"inference", "sessions", "batches"}),
        priorities=frozenset({"interactive", "standard", "batch"}),
    ),
    "batch": AccessRole(
        "batch", frozenset({"inference", "batches"}), priorities=frozenset({"standard", "batch"})
    ),
    "reader": AccessRole("reader", frozenset({"status"}), models=frozenset(), priorities=frozenset()),
}


def _names(field: str, raw: str, known: Iterable[str] | None) -> frozenset[str] | None:
    values = [v.strip().lower() if known is not None else v.strip() for v in raw.split(",") if v.strip()]
    if ALL in values:
        return None
    if known is not None:
        allowed = set(known)
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise RoleError(f"{field}: unknown {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    return frozenset(values)


def parse_role(spec: str) -> AccessRole:
    """`name[:rpcs=a,b][:models=m1,m2][:priorities=p1,p2]`."""
    name, *parts = [p.strip() for p in spec.split(":")]
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise RoleError(f"role {spec!r}: needs a name of letters, digits, '-' or '_'")
    groups: frozenset[str] = GROUPS
    models: frozenset[str] | None = None
    priorities: frozenset[str] = frozenset(PRIORITIES)
    for part in parts:
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise RoleError(f"role {name!r}: {part!r} must read key=value")
        if key == "rpcs":
            named = _names(f"role {name!r} rpcs", raw, GROUPS)
            groups = GROUPS if named is None else named
        elif key == "models":
            models = _names(f"role {name!r} models", raw, None)
        elif key == "priorities":
            named = _names(f"role {name!r} priorities", raw, PRIORITIES)
            priorities = frozenset(PRIORITIES) if named is None else named
        else:
            raise RoleError(f"role {name!r}: unknown field {key!r} (rpcs, models, priorities)")
    return AccessRole(name, groups, models, priorities)


def build_roles(specs: Iterable[str]) -> dict[str, AccessRole]:
    """The built-in roles, overridden or extended by `specs`."""
    roles = dict(BUILTIN_ROLES)
    for spec in specs:
        role = parse_role(spec)
        roles[role.name] = role
    return roles


def role_of(roles: Mapping[str, AccessRole], name: str) -> AccessRole | None:
    return roles.get(name)
