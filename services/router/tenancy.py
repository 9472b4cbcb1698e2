"""Which tenant a call acts for. Until authentication lands every caller is the default
tenant; this is the one place that decides, so API keys can replace it."""

from __future__ import annotations

import grpc

DEFAULT_TENANT = "default"


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    return DEFAULT_TENANT
