"""Client of the session service: forwards session calls and fetches/records conversation
turns for Generate, telling "unreachable" apart from answers like NOT_FOUND."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.session.v1 import session_pb2_grpc
from services.common.errors import Unavailable
from services.router import convert
from services.router.core.domain import HistoryMessage, NewTurn

# Codes meaning the service could not answer at all, as opposed to answering "no".
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Share of a request's remaining deadline that reading its history may take: a slow session
# service then costs the answer its history (marked degraded), not the answer itself.
HISTORY_SHARE = 0.5
# Left of the deadline after recording a turn, for the answer's last message to reach the caller:
# a record that takes longer is given up (the answer says the turn was not recorded).
RECORD_RESERVE_S = 0.1


class SessionUnavailable(Unavailable):
    """The session service could not be reached."""


class SessionClient:
    def __init__(self, address: str, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel
        self.stub = session_pb2_grpc.SessionStoreStub(channel)

    async def close(self) -> None:
        await self._channel.close()

    def _timeout(self, remaining: float | None) -> float:
        return self.timeout_s if remaining is None else min(self.timeout_s, remaining)

    def _unreachable(self, exc: grpc.aio.AioRpcError) -> SessionUnavailable:
        return SessionUnavailable(
            f"session service at {self.address} is unavailable ({exc.code().name}: {exc.details()})"
        )

    async def unary(self, method: str, request: Any, remaining: float | None) -> Any:
        """Call `method` of SessionStore; its own errors (NOT_FOUND, ...) pass through unchanged."""
        try:
            return await getattr(self.stub, method)(request, timeout=self._timeout(remaining))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise self._unreachable(exc) from None
            raise

    async def export(self, request: Any, remaining: float | None) -> AsyncIterator[Any]:
        # An export streams many sessions: only the caller's deadline bounds it.
        call = self.stub.ExportUserData(request, timeout=remaining)
        try:
            while (item := await call.read()) is not grpc.aio.EOF:
                yield item
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                raise self._unreachable(exc) from None
            raise
        finally:
            call.cancel()

    async def window(
        self, tenant: str, session_id: str, token_budget: int, remaining: float | None
    ) -> list[HistoryMessage]:
        share = None if remaining is None else remaining * HISTORY_SHARE
        resp = await self.unary("GetWindow", convert.window_request(tenant, session_id, token_budget), share)
        return convert.window_from_pb(resp)

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[NewTurn], remaining: float | None
    ) -> None:
        bound = None if remaining is None else max(remaining - RECORD_RESERVE_S, 0.001)
        await self.unary("AppendMessages", convert.append_turns_request(tenant, session_id, turns), bound)

    async def health(self, timeout_s: float) -> tuple[bool, str]:
        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"unreachable: {exc.code().name}: {exc.details()}"
        serving = resp.status == health_pb2.HealthCheckResponse.SERVING
        return serving, "ok" if serving else "health is not SERVING"
