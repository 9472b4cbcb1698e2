"""Typed domain errors and their mapping to precise gRPC status codes.

Cores raise these; servicers wrap their methods with `grpc_errors` so every
domain error reaches the client with the right code and a message that says
what was wrong. Anything else is logged and answered with INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class DomainError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgument(DomainError):
    """Bad input. The message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(DomainError):
    """No API key, or one that is malformed, unknown or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    """The caller's role does not allow this; the message names what was refused."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(DomainError):
    """Overload or quota. Carries gRPC's retry pushback so clients back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("grpc-retry-pushback-ms", str(self.retry_after_ms)),)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, DomainError):
        md = exc.trailing_metadata()
        if md:
            context.set_trailing_metadata(md)
        await context.abort(exc.code, exc.message)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status on rather than hiding it as INTERNAL.
        await context.abort(exc.code(), exc.details() or "")
    logger.exception("unhandled error in handler")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def grpc_errors(method: F) -> F:
    """Map exceptions raised by a servicer method (unary or streaming) to statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:
                await _abort(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return unary_wrapper  # type: ignore[return-value]


def unimplemented(what: str, issue_hint: str = "") -> Callable[..., Awaitable[Any]]:
    """A servicer method that answers UNIMPLEMENTED with a message saying so."""

    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        detail = f"{what} is not implemented yet in this version of infermesh"
        if issue_hint:
            detail += f" ({issue_hint})"
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, detail)

    return method
