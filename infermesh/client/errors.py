"""Errors of the Python client: one exception type per answer a caller handles differently."""

from __future__ import annotations

import grpc

# Messages gRPC itself gives when no connection could be made at all, as opposed to
# UNAVAILABLE answered by the router (e.g. no healthy worker).
_TRANSPORT_FAILURES = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "connection refused",
)
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class InfermeshError(Exception):
    """The router answered with a status other than OK (or could not be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        # The router's pushback on RESOURCE_EXHAUSTED: wait this long before trying again.
        self.retry_after_ms = retry_after_ms


class ConnectionFailed(InfermeshError):
    """No connection to the router could be made at all."""

    def __init__(self, address: str, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)
        self.address = address

    @property
    def tls_mismatch(self) -> bool:
        """Something listens there but dropped the connection while it was set up: most often
        TLS on one side only, or a client certificate the router wants and did not get."""
        text = self.details.lower()
        return any(s in text for s in ("socket closed", "ssl", "handshake", "certificate"))

    def __str__(self) -> str:
        if self.tls_mismatch:
            return (
                f"the router at {self.address} closed the connection while it was set up ({self.details}); "
                "does it want TLS or a client certificate?"
            )
        return (
            f"cannot reach the infermesh router at {self.address} ({self.details}); "
            "is the mesh running? `make up` starts one locally"
        )


class InvalidArgument(InfermeshError):
    """The request was wrong; the message names the field and the limit."""


class NotFound(InfermeshError):
    pass


class Unauthenticated(InfermeshError):
    pass


class PermissionDenied(InfermeshError):
    pass


class Overloaded(InfermeshError):
    """RESOURCE_EXHAUSTED: queue full or quota spent; `retry_after_ms` says when to come back."""


class Unavailable(InfermeshError):
    """The router is up but could not serve (no healthy worker, ...), after the retries."""


class DeadlineExceeded(InfermeshError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[InfermeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def is_transport_failure(code: grpc.StatusCode, details: str) -> bool:
    return code is grpc.StatusCode.UNAVAILABLE and details.lower().startswith(_TRANSPORT_FAILURES)


def from_rpc_error(exc: grpc.RpcError, address: str) -> InfermeshError:
    """The typed error for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or ""  # type: ignore[attr-defined]
    if is_transport_failure(code, details):
        return ConnectionFailed(address, details)
    retry_after_ms = None
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == PUSHBACK_KEY and str(value).isdigit():
            retry_after_ms = int(value)
    return _BY_CODE.get(code, InfermeshError)(code, details, retry_after_ms)
