"""Protobuf <-> session core values; the only module of the service that touches protobuf."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2
from services.session.model import (
    AppendResult,
    EraseResult,
    HistoryPage,
    Message,
    NewMessage,
    NewSession,
    SessionExport,
    SessionInfo,
    Window,
)


def _timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def new_session_from_pb(request: session_pb2.CreateSessionRequest) -> NewSession:
    return NewSession(
        tenant=request.tenant,
        user_id=request.user_id,
        model=request.model,
        metadata=dict(request.metadata),
        retention_days=request.retention_days,
        session_id=request.session_id,
    )


def new_messages_from_pb(request: session_pb2.AppendMessagesRequest) -> list[NewMessage]:
    return [NewMessage(m.role, m.content, m.client_msg_id, m.token_count) for m in request.messages]


def expected_last_seq_from_pb(request: session_pb2.AppendMessagesRequest) -> int | None:
    return request.expected_last_seq if request.HasField("expected_last_seq") else None


def session_to_pb(info: SessionInfo) -> common_pb2.Session:
    return common_pb2.Session(
        session_id=info.session_id,
        tenant=info.tenant,
        user_id=info.user_id,
        model=info.model,
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        metadata=dict(info.metadata),
        last_seq=info.last_seq,
        retention_days=info.retention_days,
    )


def message_to_pb(message: Message) -> common_pb2.Message:
    return common_pb2.Message(
        seq=message.seq,
        role=int(message.role),  # type: ignore[arg-type]
        content=message.content,
        client_msg_id=message.client_msg_id,
        token_count=message.token_count,
        created_at=_timestamp(message.created_at),
    )


def append_to_pb(result: AppendResult) -> session_pb2.AppendMessagesResponse:
    return session_pb2.AppendMessagesResponse(
        messages=[message_to_pb(m) for m in result.messages], last_seq=result.last_seq
    )


def history_to_pb(page: HistoryPage) -> session_pb2.GetHistoryResponse:
    return session_pb2.GetHistoryResponse(
        messages=[message_to_pb(m) for m in page.messages], has_more=page.has_more
    )


def window_to_pb(window: Window) -> session_pb2.GetWindowResponse:
    return session_pb2.GetWindowResponse(
        messages=[message_to_pb(m) for m in window.messages],
        last_seq=window.last_seq,
        truncated=window.truncated,
    )


def export_to_pb(export: SessionExport) -> common_pb2.SessionExport:
    return common_pb2.SessionExport(
        session=session_to_pb(export.session), messages=[message_to_pb(m) for m in export.messages]
    )


def erase_to_pb(result: EraseResult) -> session_pb2.EraseUserDataResponse:
    return session_pb2.EraseUserDataResponse(
        sessions_erased=result.sessions_erased, messages_erased=result.messages_erased
    )
