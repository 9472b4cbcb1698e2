"""Sessions through the router: history prepended, turns recorded once, failures degrade."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.router.conftest import Mesh
from tests.integration.router.helpers import (
    chat_request,
    collect,
    free_port,
    start_router,
    text_of,
    wait_healthy,
    wait_until,
)

ROLE = common_pb2.Role


async def new_session(mesh: Mesh) -> str:
    session = await mesh.stub.CreateSession(router_pb2.CreateSessionRequest(user_id="ada"), timeout=5)
    return str(session.session_id)


def worker_saw(mesh: Mesh, request_id: str) -> list[tuple[str, str]]:
    (sent,) = [r for w in mesh.workers for r in w.requests if r.request_id == request_id]
    return [(ROLE.Name(m.role), m.content) for m in sent.messages]


async def test_history_is_prepended_and_both_turns_are_appended(mesh: Mesh) -> None:
    session_id = await new_session(mesh)
    system = common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="be brief")
    first = chat_request("my name is Ada", session_id=session_id)
    first.messages.insert(0, system)
    responses = await collect(mesh.stub, first)
    assert responses[0].session_id == session_id
    assert not responses[0].degraded and not responses[-1].degraded

    second = chat_request("what is my name", session_id=session_id)
    await collect(mesh.stub, second)

    assert worker_saw(mesh, second.request_id) == [
        ("ROLE_SYSTEM", "be brief"),
        ("ROLE_USER", "my name is Ada"),
        ("ROLE_ASSISTANT", "echo: my name is Ada"),
        ("ROLE_USER", "what is my name"),
    ]
    history = await mesh.stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session_id), timeout=5)
    assert [(ROLE.Name(m.role), m.content) for m in history.messages] == [
        ("ROLE_SYSTEM", "be brief"),
        ("ROLE_USER", "my name is Ada"),
        ("ROLE_ASSISTANT", "echo: my name is Ada"),
        ("ROLE_USER", "what is my name"),
        ("ROLE_ASSISTANT", "echo: what is my name"),
    ]
    assert [m.seq for m in history.messages] == [1, 2, 3, 4, 5]
    reply = history.messages[-1]
    assert reply.client_msg_id == f"{second.request_id}/reply"
    assert reply.token_count == 5  # completion tokens from the worker's usage
    # Each turn went to the store in one AppendMessages call.
    calls = [c for c in mesh.sessions.append_calls if c.session_id == session_id]
    assert [len(c.messages) for c in calls] == [3, 2]
    assert all(c.tenant == "default" for c in calls)
    window = [c for c in mesh.sessions.window_calls if c.session_id == session_id][-1]
    assert window.token_budget == 2048 and window.tenant == "default"


async def test_cancelled_reply_is_kept_as_delivered_and_marked_incomplete(mesh: Mesh) -> None:
    session_id = await new_session(mesh)
    for worker in mesh.workers:
        worker.hold_after = 3  # three tokens, then the stream waits
        worker.release.clear()
    try:
        request = chat_request("count one two three four five six", session_id=session_id)
        call = mesh.stub.Generate(request, timeout=10)
        received = [await call.read() for _ in range(3)]
        call.cancel()
        delivered = "".join(r.text for r in received)
        assert delivered == "echo: count one "

        async def stored() -> list[common_pb2.Message]:
            history = await mesh.stub.GetHistory(
                router_pb2.GetHistoryRequest(session_id=session_id), timeout=5
            )
            return list(history.messages)

        await wait_until(lambda: _has_reply(stored()), what="the cancelled turn recorded")
    finally:
        for worker in mesh.workers:
            worker.hold_after = None
            worker.release.set()
    user_turn, reply = await stored()
    assert (ROLE.Name(user_turn.role), user_turn.content) == (
        "ROLE_USER",
        "count one two three four five six",
    )
    assert (ROLE.Name(reply.role), reply.content) == ("ROLE_ASSISTANT", delivered)
    assert reply.client_msg_id == f"{request.request_id}/reply-incomplete"
    assert reply.token_count == 3  # the tokens the client was sent
    # One AppendMessages: the user turn and the partial reply together.
    calls = [c for c in mesh.sessions.append_calls if c.session_id == session_id]
    assert [len(c.messages) for c in calls] == [2]

    # The next turn sees the partial reply as history.
    follow_up = chat_request("go on", session_id=session_id)
    await collect(mesh.stub, follow_up)
    assert worker_saw(mesh, follow_up.request_id)[-2:] == [
        ("ROLE_ASSISTANT", delivered),
        ("ROLE_USER", "go on"),
    ]


async def _has_reply(messages: Awaitable[list[common_pb2.Message]]) -> bool:
    return any(m.role == common_pb2.ROLE_ASSISTANT for m in await messages)


async def test_retry_with_same_request_id_does_not_duplicate(mesh: Mesh) -> None:
    session_id = await new_session(mesh)
    req = chat_request("only once", session_id=session_id)
    first = text_of(await collect(mesh.stub, req))
    retry = text_of(await collect(mesh.stub, req))
    assert first == retry == "echo: only once"
    # The retry saw the history as the first attempt did, not its own earlier turn.
    sent = [r for w in mesh.workers for r in w.requests if r.request_id == req.request_id]
    assert [[m.content for m in r.messages] for r in sent] == [["only once"], ["only once"]]
    history = await mesh.stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session_id), timeout=5)
    assert [m.content for m in history.messages] == ["only once", "echo: only once"]


async def test_retry_with_a_different_reply_keeps_the_first_recording(mesh: Mesh) -> None:
    session_id = await new_session(mesh)
    req = chat_request("sampled", session_id=session_id)
    await collect(mesh.stub, req)
    for worker in mesh.workers:
        worker.reply_prefix = "other: "
    try:
        retry = await collect(mesh.stub, req)
    finally:
        for worker in mesh.workers:
            worker.reply_prefix = "echo: "
    assert text_of(retry) == "other: sampled"
    assert not retry[-1].degraded  # the turn is recorded, by the first attempt
    history = await mesh.stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session_id), timeout=5)
    assert [m.content for m in history.messages] == ["sampled", "echo: sampled"]


async def test_unknown_session_is_not_found_before_generation(mesh: Mesh) -> None:
    req = chat_request("hello?", session_id="no-such-session")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(mesh.stub, req, timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no-such-session" in (err.value.details() or "")
    assert req.request_id not in [r.request_id for w in mesh.workers for r in w.requests]


async def test_session_rpcs_are_forwarded(mesh: Mesh) -> None:
    session = await mesh.stub.CreateSession(
        router_pb2.CreateSessionRequest(user_id="grace", model="m", metadata={"k": "v"}, retention_days=7),
        timeout=5,
    )
    stored = mesh.sessions.sessions[session.session_id]
    assert (stored.tenant, stored.user_id, stored.model, dict(stored.metadata), stored.retention_days) == (
        "default",
        "grace",
        "m",
        {"k": "v"},
        7,
    )
    got = await mesh.stub.GetSession(router_pb2.GetSessionRequest(session_id=session.session_id), timeout=5)
    assert got.user_id == "grace"

    appended = await mesh.stub.AppendMessages(
        router_pb2.AppendMessagesRequest(
            session_id=session.session_id,
            messages=[common_pb2.NewMessage(role=common_pb2.ROLE_USER, content="note", client_msg_id="c1")],
            expected_last_seq=0,
        ),
        timeout=5,
    )
    assert appended.last_seq == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.AppendMessages(
            router_pb2.AppendMessagesRequest(
                session_id=session.session_id,
                messages=[common_pb2.NewMessage(role=common_pb2.ROLE_USER, content="late")],
                expected_last_seq=0,
            ),
            timeout=5,
        )
    assert err.value.code() is grpc.StatusCode.ABORTED

    exports = [e async for e in mesh.stub.ExportUserData(router_pb2.ExportUserDataRequest(user_id="grace"))]
    assert [(e.session.session_id, [m.content for m in e.messages]) for e in exports] == [
        (session.session_id, ["note"])
    ]
    await mesh.stub.DeleteSession(router_pb2.DeleteSessionRequest(session_id=session.session_id), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.GetSession(router_pb2.GetSessionRequest(session_id=session.session_id), timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_session_service_down_degrades_instead_of_failing(mesh: Mesh) -> None:
    router = await start_router(
        worker_addresses=[s.address for s in mesh.worker_servers], session_address=f"127.0.0.1:{free_port()}"
    )
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {s.address for s in mesh.worker_servers})
            responses = await collect(stub, chat_request("still answer", session_id="s-any"), timeout=5)
            assert text_of(responses) == "echo: still answer"
            (note,) = responses[0].degraded
            assert note.step == common_pb2.DEGRADATION_STEP_HISTORY_UNAVAILABLE
            assert "session service at" in note.reason and "without history" in note.reason

            # Plain session calls say plainly that the service is unavailable.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetSession(router_pb2.GetSessionRequest(session_id="s-any"), timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "session service at" in (err.value.details() or "")
    finally:
        await router.stop(0)


@pytest.mark.parametrize("slow", ["window", "append"])
async def test_a_slow_session_service_costs_the_history_not_the_answer(mesh: Mesh, slow: str) -> None:
    session_id = await new_session(mesh)
    setattr(mesh.sessions, f"{slow}_delay_s", 30.0)
    try:
        start = time.monotonic()
        responses = await collect(mesh.stub, chat_request("in time", session_id=session_id), timeout=2)
        took = time.monotonic() - start
    finally:
        mesh.sessions.window_delay_s = mesh.sessions.append_delay_s = 0.0
    # A history read gives up at half the deadline, a record just before its end.
    assert text_of(responses) == "echo: in time" and took < 2
    (note,) = responses[0 if slow == "window" else -1].degraded
    assert note.step == common_pb2.DEGRADATION_STEP_HISTORY_UNAVAILABLE
    assert ("without history" if slow == "window" else "not recorded") in note.reason


async def test_append_failure_after_reply_is_reported_as_degraded(mesh: Mesh) -> None:
    session_id = await new_session(mesh)
    req = chat_request("deleted under me", session_id=session_id)
    for worker in mesh.workers:
        worker.hold_after = 1
        worker.release.clear()
    try:
        call = mesh.stub.Generate(req, timeout=5)
        first = await call.read()
        # The session disappears while the reply is being generated.
        await mesh.stub.DeleteSession(router_pb2.DeleteSessionRequest(session_id=session_id), timeout=5)
        for worker in mesh.workers:
            worker.release.set()
        rest = []
        while (resp := await call.read()) is not grpc.aio.EOF:
            rest.append(resp)
    finally:
        for worker in mesh.workers:
            worker.hold_after = None
    assert first.text + "".join(r.text for r in rest) == "echo: deleted under me"
    (note,) = rest[-1].degraded
    assert note.step == common_pb2.DEGRADATION_STEP_HISTORY_UNAVAILABLE
    assert "not recorded" in note.reason and "NOT_FOUND" in note.reason


async def test_sessions_disabled_is_failed_precondition(mesh: Mesh) -> None:
    router = await start_router(worker_addresses=[s.address for s in mesh.worker_servers])
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {s.address for s in mesh.worker_servers})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="u"), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "no session service is configured" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, chat_request("hi", session_id=uuid.uuid4().hex), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "session_id: no session service is configured" in (err.value.details() or "")
            # Without a session the same router answers.
            assert text_of(await collect(stub, chat_request("hi"), timeout=5)) == "echo: hi"
    finally:
        await router.stop(0)


async def test_the_recorded_reply_is_the_redacted_one_the_client_saw(mesh: Mesh) -> None:
    router = await start_router(
        worker_addresses=[s.address for s in mesh.worker_servers],
        session_address=mesh.session_server.address,
        guard_pii_output=True,
    )
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {s.address for s in mesh.worker_servers})
            session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="ada"), timeout=5)
            request = chat_request("write to jane@example.com", session_id=session.session_id, max_tokens=64)
            seen = text_of(await collect(stub, request, timeout=5))
            history = await stub.GetHistory(
                router_pb2.GetHistoryRequest(session_id=session.session_id), timeout=5
            )
    finally:
        await router.stop(0)
    # The fake worker echoes the prompt: its reply carries the address, the client never saw it.
    assert seen == "echo: write to [EMAIL]"
    assert [(ROLE.Name(m.role), m.content) for m in history.messages][-1] == ("ROLE_ASSISTANT", seen)
