"""Typed domain errors, each naming the gRPC status it is answered with.

Pure cores raise these without importing grpc (the status is a name here; `code` turns it
into grpc's enum at the edge, where `services.common.status.grpc_errors` maps every domain
error to its status with a message that says what was wrong).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class DomainError(Exception):
    status = "UNKNOWN"  # the name of the grpc.StatusCode it is answered with

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        import grpc  # only the edge asks, and it has grpc loaded already

        return grpc.StatusCode[self.status]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgument(DomainError):
    """Bad input. The message names the field and the limit."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(DomainError):
    status = "NOT_FOUND"


class AlreadyExists(DomainError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    status = "FAILED_PRECONDITION"


class Aborted(DomainError):
    status = "ABORTED"


class Unavailable(DomainError):
    status = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    status = "DEADLINE_EXCEEDED"


class Unauthenticated(DomainError):
    """No API key, or one that is malformed, unknown or revoked."""

    status = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller's role does not allow this; the message names what was refused."""

    status = "PERMISSION_DENIED"


class Unimplemented(DomainError):
    status = "UNIMPLEMENTED"


class ResourceExhausted(DomainError):
    """Overload or quota. Carries gRPC's retry pushback so clients back off."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("grpc-retry-pushback-ms", str(self.retry_after_ms)),)
