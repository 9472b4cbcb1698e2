"""Protobuf conversion of the session service."""

from __future__ import annotations

import datetime as dt

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2
from services.session import convert
from services.session.model import Message, Role, SessionInfo, Window

T0 = dt.datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)


def test_requests_from_pb():
    request = session_pb2.CreateSessionRequest(
        tenant="t", user_id="u", model="m", metadata={"a": "b"}, retention_days=9, session_id="s"
    )
    new = convert.new_session_from_pb(request)
    assert (new.tenant, new.user_id, new.model, dict(new.metadata), new.retention_days, new.session_id) == (
        "t",
        "u",
        "m",
        {"a": "b"},
        9,
        "s",
    )
    append = session_pb2.AppendMessagesRequest(
        messages=[
            common_pb2.NewMessage(role=common_pb2.ROLE_TOOL, content="c", client_msg_id="k", token_count=4)
        ]
    )
    (message,) = convert.new_messages_from_pb(append)
    assert (message.role, message.content, message.client_msg_id, message.token_count) == (4, "c", "k", 4)


def test_expected_last_seq_presence():
    assert convert.expected_last_seq_from_pb(session_pb2.AppendMessagesRequest()) is None
    assert convert.expected_last_seq_from_pb(session_pb2.AppendMessagesRequest(expected_last_seq=0)) == 0


def test_session_and_window_to_pb():
    info = SessionInfo("s", "t", "u", "m", T0, T0 + dt.timedelta(seconds=1), {"a": "b"}, 3, 30)
    pb = convert.session_to_pb(info)
    assert pb.created_at.ToDatetime(dt.UTC) == T0
    assert (pb.session_id, pb.last_seq, pb.retention_days, dict(pb.metadata)) == ("s", 3, 30, {"a": "b"})

    message = Message(2, Role.ASSISTANT, "hi", "k", 1, T0)
    window = convert.window_to_pb(Window([message], 3, True))
    assert window.truncated and window.last_seq == 3
    assert window.messages[0].role == common_pb2.ROLE_ASSISTANT
    assert window.messages[0].created_at.ToDatetime(dt.UTC) == T0
