"""Domain errors at the gRPC edge: servicer methods wrapped with `grpc_errors` answer every
DomainError with its status and message, a downstream call's failure with its own status, and
anything else (logged) with INTERNAL."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import DomainError

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
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
                await abort_with(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return unary_wrapper  # type: ignore[return-value]


def unimplemented(what: str, issue_hint: str = "") -> Callable[..., Awaitable[Any]]:
    """A servicer method that answers UNIMPLEMENTED with a message saying so."""

    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        detail = f"{what} is not implemented yet in this version of infermesh"
        if issue_hint:
            detail += f" ({issue_hint})"
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, detail)

    return method
