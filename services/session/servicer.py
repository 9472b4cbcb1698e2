"""gRPC servicer of infermesh.session.v1.SessionStore: validate, call the store, convert."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.common.errors import Unavailable
from services.common.status import grpc_errors
from services.session import convert, validation
from services.session.store import Store
from services.session.validation import Limits

T = TypeVar("T")

# Answer this long before the caller's deadline, so that UNAVAILABLE arrives in time.
DEADLINE_MARGIN_S = 0.02


async def within_deadline(context: grpc.aio.ServicerContext, call: Awaitable[T], guard_below_s: float) -> T:
    """`call`, given up with UNAVAILABLE just before the request's deadline when that is less
    than `guard_below_s` away (a hung database must not hold the caller past it). Calls with
    more time left, or none set, are bounded by the database timeouts alone, which saves a task
    per call."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= guard_below_s:
        return await call
    # A task of its own: once cancelled, it may take a while to let go of a hung connection,
    # and the caller must not wait for that.
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(remaining - DEADLINE_MARGIN_S, 0.0))
    except asyncio.CancelledError:
        # The caller went away: so does its call.
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_discard_outcome)
        raise Unavailable("the session database did not answer within the request deadline; retry")
    return task.result()


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class SessionStoreServicer(session_pb2_grpc.SessionStoreServicer):
    """`guard_below_s`: requests whose deadline is nearer than this are answered UNAVAILABLE
    before it if the store has not answered; set it to what the store's own timeouts allow a
    call to take."""

    def __init__(
        self,
        store: Store,
        limits: Limits,
        ready: Callable[[], bool] = lambda: True,
        guard_below_s: float = math.inf,
    ) -> None:
        self._store = store
        self._limits = limits
        self._ready = ready
        self._guard_below_s = guard_below_s

    def _bounded(self, context: grpc.aio.ServicerContext, call: Awaitable[T]) -> Awaitable[T]:
        return within_deadline(context, call, self._guard_below_s)

    def _check_ready(self) -> None:
        # Before the first successful probe the schema may not exist yet.
        if not self._ready():
            raise Unavailable("session store is starting: database not reachable or not migrated yet")

    @grpc_errors
    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        new = validation.normalize_new_session(convert.new_session_from_pb(request))
        self._check_ready()
        return convert.session_to_pb(await self._bounded(context, self._store.create_session(new)))

    @grpc_errors
    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        validation.check_session_ref(request.tenant, request.session_id)
        self._check_ready()
        info = await self._bounded(context, self._store.get_session(request.tenant, request.session_id))
        return convert.session_to_pb(info)

    @grpc_errors
    async def AppendMessages(
        self, request: session_pb2.AppendMessagesRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendMessagesResponse:
        validation.check_session_ref(request.tenant, request.session_id)
        new = validation.normalize_messages(convert.new_messages_from_pb(request), self._limits)
        expected = convert.expected_last_seq_from_pb(request)
        if expected is not None:
            validation.check_seq("expected_last_seq", expected)
        self._check_ready()
        result = await self._bounded(
            context, self._store.append(request.tenant, request.session_id, new, expected)
        )
        return convert.append_to_pb(result)

    @grpc_errors
    async def GetHistory(
        self, request: session_pb2.GetHistoryRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetHistoryResponse:
        validation.check_session_ref(request.tenant, request.session_id)
        validation.check_seq("after_seq", request.after_seq)
        limit = validation.page_size(request.page_size, self._limits)
        self._check_ready()
        page = await self._bounded(
            context, self._store.history(request.tenant, request.session_id, request.after_seq, limit)
        )
        return convert.history_to_pb(page)

    @grpc_errors
    async def GetWindow(
        self, request: session_pb2.GetWindowRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetWindowResponse:
        validation.check_session_ref(request.tenant, request.session_id)
        self._check_ready()
        window = await self._bounded(
            context, self._store.window(request.tenant, request.session_id, request.token_budget)
        )
        return convert.window_to_pb(window)

    @grpc_errors
    async def DeleteSession(
        self, request: session_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteSessionResponse:
        validation.check_session_ref(request.tenant, request.session_id)
        self._check_ready()
        await self._bounded(context, self._store.delete_session(request.tenant, request.session_id))
        return session_pb2.DeleteSessionResponse()

    @grpc_errors
    async def ExportUserData(
        self, request: session_pb2.ExportUserDataRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.SessionExport]:
        validation.check_user_ref(request.tenant, request.user_id)
        self._check_ready()
        async for export in self._store.export_user(request.tenant, request.user_id):
            yield convert.export_to_pb(export)

    @grpc_errors
    async def EraseUserData(
        self, request: session_pb2.EraseUserDataRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.EraseUserDataResponse:
        validation.check_user_ref(request.tenant, request.user_id)
        self._check_ready()
        erased = await self._bounded(context, self._store.erase_user(request.tenant, request.user_id))
        return convert.erase_to_pb(erased)
