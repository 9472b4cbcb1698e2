"""Request builders for the session service tests."""

from __future__ import annotations

from typing import Any

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2, session_pb2_grpc

TENANT = "acme"
# Every call has a deadline: a hang fails the test instead of stalling the suite.
TIMEOUT_S = 10.0
USER = "user-1"


def msg(content: str, role: Any = common_pb2.ROLE_USER, client_msg_id: str = "", tokens: int = 0) -> Any:
    return common_pb2.NewMessage(role=role, content=content, client_msg_id=client_msg_id, token_count=tokens)


async def create(
    stub: session_pb2_grpc.SessionStoreStub,
    tenant: str = TENANT,
    user: str = USER,
    timeout: float = TIMEOUT_S,
    **kwargs: Any,
) -> common_pb2.Session:
    return await stub.CreateSession(
        session_pb2.CreateSessionRequest(
            tenant=tenant, user_id=user, model="smollm2-135m-instruct", **kwargs
        ),
        timeout=timeout,
    )


async def append(
    stub: session_pb2_grpc.SessionStoreStub,
    session_id: str,
    *messages: Any,
    tenant: str = TENANT,
    timeout: float = TIMEOUT_S,
    **kwargs: Any,
) -> session_pb2.AppendMessagesResponse:
    return await stub.AppendMessages(
        session_pb2.AppendMessagesRequest(
            tenant=tenant, session_id=session_id, messages=list(messages), **kwargs
        ),
        timeout=timeout,
    )


async def history(
    stub: session_pb2_grpc.SessionStoreStub,
    session_id: str,
    tenant: str = TENANT,
    timeout: float = TIMEOUT_S,
    **kwargs: Any,
) -> session_pb2.GetHistoryResponse:
    return await stub.GetHistory(
        session_pb2.GetHistoryRequest(tenant=tenant, session_id=session_id, **kwargs), timeout=timeout
    )


async def all_history(
    stub: session_pb2_grpc.SessionStoreStub, session_id: str, tenant: str = TENANT
) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        page = await history(stub, session_id, tenant=tenant, after_seq=after, page_size=50)
        out.extend(page.messages)
        if not page.has_more:
            return out
        after = page.messages[-1].seq


async def status_of(call: Any) -> grpc.aio.AioRpcError:
    """The error a call fails with (the test fails if it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")
