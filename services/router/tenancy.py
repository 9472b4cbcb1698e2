"""Which tenant a call acts for: the authenticated API key's (see `auth`), or the default
tenant when authentication is off. This is the one place that decides."""

from __future__ import annotations

import grpc

from services.router.auth import DEFAULT_TENANT, current_principal

__all__ = ["DEFAULT_TENANT", "tenant_of"]


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    principal = current_principal()
    return DEFAULT_TENANT if principal is None else principal.tenant
