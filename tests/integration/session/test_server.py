"""The SessionStore gRPC service on a real server (port 0), over SQLite and Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2
from services.session.server import SERVICE_NAME

from .helpers import TENANT, USER, all_history, append, create, history, msg, status_of

SYSTEM, USER_ROLE, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


async def test_health_serving_for_the_service(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_create_and_get(stub):
    created = await create(stub, metadata={"app": "docs", "lang": "en"}, retention_days=30)
    assert uuid.UUID(created.session_id)
    assert (created.tenant, created.user_id, created.model) == (TENANT, USER, "smollm2-135m-instruct")
    assert created.last_seq == 0 and created.retention_days == 30
    age = dt.datetime.now(dt.UTC) - created.created_at.ToDatetime(dt.UTC)
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=1)

    got = await stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=created.session_id))
    assert got == created


async def test_create_with_client_id_is_idempotent_for_the_same_owner(stub):
    first = await create(stub, session_id="chat-42")
    again = await create(stub, session_id="chat-42")
    assert again == first
    err = await status_of(create(stub, session_id="chat-42", user="someone-else"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_append_assigns_consecutive_seqs_and_updates_the_session(stub):
    s = await create(stub)
    first = await append(stub, s.session_id, msg("be brief", SYSTEM), msg("hello"))
    second = await append(stub, s.session_id, msg("hi!", ASSISTANT, tokens=3))
    assert [m.seq for m in first.messages] == [1, 2] and first.last_seq == 2
    assert [m.seq for m in second.messages] == [3] and second.last_seq == 3
    assert second.messages[0].token_count == 3
    # No count given: estimated from the content, never 0 for text.
    assert first.messages[1].token_count >= 1

    got = await stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=s.session_id))
    assert got.last_seq == 3
    assert got.updated_at.ToDatetime() >= s.updated_at.ToDatetime()
    stored = await all_history(stub, s.session_id)
    assert [(m.seq, m.role, m.content) for m in stored] == [
        (1, SYSTEM, "be brief"),
        (2, USER_ROLE, "hello"),
        (3, ASSISTANT, "hi!"),
    ]


async def test_history_pages_by_seq(stub):
    s = await create(stub)
    for start in range(0, 25, 5):
        await append(stub, s.session_id, *(msg(f"m{i}") for i in range(start, start + 5)))

    page = await history(stub, s.session_id)  # default page size 10
    assert [m.seq for m in page.messages] == list(range(1, 11)) and page.has_more
    page = await history(stub, s.session_id, after_seq=20, page_size=3)
    assert [m.seq for m in page.messages] == [21, 22, 23] and page.has_more
    page = await history(stub, s.session_id, after_seq=23, page_size=3)
    assert [m.content for m in page.messages] == ["m23", "m24"] and not page.has_more
    page = await history(stub, s.session_id, after_seq=25)
    assert list(page.messages) == [] and not page.has_more
    assert [m.seq for m in await all_history(stub, s.session_id)] == list(range(1, 26))


async def test_retried_append_returns_the_originals(stub):
    s = await create(stub)
    batch = [msg("q1", client_msg_id="c-1"), msg("q2", client_msg_id="c-2")]
    first = await append(stub, s.session_id, *batch)
    retry = await append(stub, s.session_id, *batch)
    assert list(retry.messages) == list(first.messages)
    assert retry.last_seq == first.last_seq == 2
    # Even when the retry carries the expected_last_seq of the original attempt.
    stale = await append(stub, s.session_id, *batch, expected_last_seq=0)
    assert list(stale.messages) == list(first.messages)
    assert len(await all_history(stub, s.session_id)) == 2

    # A batch mixing a stored id with a new one writes only the new message.
    mixed = await append(stub, s.session_id, msg("q2", client_msg_id="c-2"), msg("q3", client_msg_id="c-3"))
    assert [m.seq for m in mixed.messages] == [2, 3] and mixed.last_seq == 3


async def test_empty_client_ids_do_not_collide(stub):
    s = await create(stub)
    await append(stub, s.session_id, msg("a"), msg("b"))
    again = await append(stub, s.session_id, msg("a"))
    assert again.last_seq == 3
    assert all(m.client_msg_id == "" for m in await all_history(stub, s.session_id))


async def test_reusing_a_client_id_for_other_content_is_refused(stub):
    s = await create(stub)
    await append(stub, s.session_id, msg("original", client_msg_id="c-1"))
    err = await status_of(append(stub, s.session_id, msg("different", client_msg_id="c-1")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "messages[0].client_msg_id" in err.details()


async def test_expected_last_seq(stub):
    s = await create(stub)
    await append(stub, s.session_id, msg("one"), expected_last_seq=0)
    err = await status_of(append(stub, s.session_id, msg("two"), expected_last_seq=0))
    assert err.code() == grpc.StatusCode.ABORTED
    assert "expected_last_seq=0" in err.details() and "at 1" in err.details()
    ok = await append(stub, s.session_id, msg("two"), expected_last_seq=1)
    assert ok.last_seq == 2
    assert len(await all_history(stub, s.session_id)) == 2


async def test_concurrent_appends_get_unique_gap_free_seqs(stub):
    s = await create(stub)

    async def writer(w: int) -> list[list[int]]:
        seqs = []
        for i in range(10):
            count = 1 + (w + i) % 2
            reply = await append(stub, s.session_id, *(msg(f"w{w}-{i}-{k}") for k in range(count)))
            seqs.append([m.seq for m in reply.messages])
        return seqs

    results = await asyncio.gather(*(writer(w) for w in range(5)))
    batches = [batch for seqs in results for batch in seqs]
    assert len(batches) == 50
    # Each batch got consecutive seqs, and all batches together cover 1..N exactly once.
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)
    every = sorted(seq for b in batches for seq in b)
    assert every == list(range(1, len(every) + 1))
    stored = await all_history(stub, s.session_id)
    assert [m.seq for m in stored] == every
    got = await stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=s.session_id))
    assert got.last_seq == len(every)


async def test_window_keeps_the_system_prompt_and_the_newest_messages(stub):
    s = await create(stub)
    await append(
        stub,
        s.session_id,
        msg("rules", SYSTEM, tokens=5),
        msg("q1", tokens=10),
        msg("a1", ASSISTANT, tokens=10),
        msg("q2", tokens=10),
        msg("a2", ASSISTANT, tokens=10),
    )

    async def window(budget: int) -> tuple[list[int], bool, int]:
        reply = await stub.GetWindow(
            session_pb2.GetWindowRequest(tenant=TENANT, session_id=s.session_id, token_budget=budget)
        )
        return [m.seq for m in reply.messages], reply.truncated, reply.last_seq

    assert await window(0) == ([1, 2, 3, 4, 5], False, 5)
    assert await window(45) == ([1, 2, 3, 4, 5], False, 5)
    assert await window(44) == ([1, 3, 4, 5], True, 5)
    assert await window(25) == ([1, 4, 5], True, 5)
    assert await window(14) == ([1], True, 5)
    assert await window(1) == ([1], True, 5)


async def test_delete_session(stub):
    s = await create(stub)
    await append(stub, s.session_id, msg("bye"))
    await stub.DeleteSession(session_pb2.DeleteSessionRequest(tenant=TENANT, session_id=s.session_id))
    for call in (
        stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=s.session_id)),
        history(stub, s.session_id),
        stub.DeleteSession(session_pb2.DeleteSessionRequest(tenant=TENANT, session_id=s.session_id)),
    ):
        assert (await status_of(call)).code() == grpc.StatusCode.NOT_FOUND
    # The id can be used again, starting from seq 1.
    again = await create(stub, session_id=s.session_id)
    assert (await append(stub, again.session_id, msg("new"))).last_seq == 1


async def test_export_and_erase_user_data(stub):
    mine = [await create(stub), await create(stub)]
    await append(stub, mine[0].session_id, msg("a"), msg("b", ASSISTANT))
    await append(stub, mine[1].session_id, msg("c"))
    other_user = await create(stub, user="user-2")
    await append(stub, other_user.session_id, msg("not mine"))
    other_tenant = await create(stub, tenant="globex")  # same user id, other tenant
    await append(stub, other_tenant.session_id, msg("other tenant"), tenant="globex")

    request = session_pb2.ExportUserDataRequest(tenant=TENANT, user_id=USER)
    exports = [e async for e in stub.ExportUserData(request)]
    assert [e.session.session_id for e in exports] == [s.session_id for s in mine]
    assert [[m.content for m in e.messages] for e in exports] == [["a", "b"], ["c"]]
    assert exports[0].messages[1].role == ASSISTANT

    erased = await stub.EraseUserData(session_pb2.EraseUserDataRequest(tenant=TENANT, user_id=USER))
    assert (erased.sessions_erased, erased.messages_erased) == (2, 3)
    assert [e async for e in stub.ExportUserData(request)] == []
    err = await status_of(history(stub, mine[0].session_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Nobody else's data went with it.
    assert [m.content for m in await all_history(stub, other_user.session_id)] == ["not mine"]
    assert [m.content for m in await all_history(stub, other_tenant.session_id, tenant="globex")] == [
        "other tenant"
    ]
    again = await stub.EraseUserData(session_pb2.EraseUserDataRequest(tenant=TENANT, user_id=USER))
    assert (again.sessions_erased, again.messages_erased) == (0, 0)


async def test_another_tenants_session_is_not_found(stub):
    s = await create(stub, session_id="shared-name")
    await append(stub, s.session_id, msg("secret"))
    sid = s.session_id
    calls = [
        stub.GetSession(session_pb2.GetSessionRequest(tenant="globex", session_id=sid)),
        append(stub, sid, msg("intrusion"), tenant="globex"),
        history(stub, sid, tenant="globex"),
        stub.GetWindow(session_pb2.GetWindowRequest(tenant="globex", session_id=sid)),
        stub.DeleteSession(session_pb2.DeleteSessionRequest(tenant="globex", session_id=sid)),
    ]
    for call in calls:
        assert (await status_of(call)).code() == grpc.StatusCode.NOT_FOUND
    exports = [
        e async for e in stub.ExportUserData(session_pb2.ExportUserDataRequest(tenant="globex", user_id=USER))
    ]
    assert exports == []
    # The same id in another tenant is a separate session.
    theirs = await create(stub, tenant="globex", session_id="shared-name")
    assert theirs.last_seq == 0
    assert [m.content for m in await all_history(stub, sid)] == ["secret"]


async def test_unknown_session_is_not_found(stub):
    sid = "no-such-session"
    calls = [
        stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=sid)),
        append(stub, sid, msg("hello")),
        history(stub, sid),
        stub.GetWindow(session_pb2.GetWindowRequest(tenant=TENANT, session_id=sid, token_budget=10)),
        stub.DeleteSession(session_pb2.DeleteSessionRequest(tenant=TENANT, session_id=sid)),
    ]
    for call in calls:
        err = await status_of(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert sid in err.details()


BAD_APPENDS = [
    pytest.param([], {}, "messages: must contain at least one message", id="no-messages"),
    pytest.param(
        [msg("x", role=common_pb2.ROLE_UNSPECIFIED)], {}, "messages[0].role: must be one of", id="role"
    ),
    pytest.param([msg("ok"), msg("x", role=9)], {}, "messages[1].role", id="unknown-role"),
    pytest.param(
        [msg("x" * 1001)], {}, "messages[0].content: must be at most 1000 characters", id="oversize"
    ),
    pytest.param([msg("x")] * 65, {}, "messages: must contain at most 64 messages", id="too-many"),
    pytest.param(
        [msg("a", client_msg_id="k"), msg("b", client_msg_id="k")],
        {},
        "messages[1].client_msg_id",
        id="dup-id",
    ),
    pytest.param([msg("x", tokens=1 << 30)], {}, "messages[0].token_count: must be <=", id="tokens"),
    pytest.param([msg("x")], {"expected_last_seq": 1 << 63}, "expected_last_seq: must be <=", id="seq"),
]


@pytest.mark.parametrize(("messages", "extra", "expected"), BAD_APPENDS)
async def test_bad_append_is_invalid_argument_and_writes_nothing(stub, messages, extra, expected):
    s = await create(stub)
    err = await status_of(append(stub, s.session_id, *messages, **extra))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details()
    assert await all_history(stub, s.session_id) == []


async def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(stub):
    calls = [
        ("tenant: is required", create(stub, tenant="")),
        ("user_id: is required", create(stub, user="")),
        ("session_id: must be 1 to 128 characters", create(stub, session_id="has space")),
        ("retention_days: must be <= 36500", create(stub, retention_days=40_000)),
        ("metadata: must have at most 64 entries", create(stub, metadata={str(i): "v" for i in range(65)})),
        ("session_id: is required", history(stub, "")),
        ("page_size: must be <= 50, got 51", history(stub, "s-1", page_size=51)),
        ("after_seq: must be <=", history(stub, "s-1", after_seq=1 << 63)),
        (
            "tenant: must be at most 128 characters",
            stub.GetSession(session_pb2.GetSessionRequest(tenant="t" * 129, session_id="s-1")),
        ),
        ("user_id: is required", stub.EraseUserData(session_pb2.EraseUserDataRequest(tenant=TENANT))),
    ]
    for expected, call in calls:
        err = await status_of(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in err.details()
    stream = stub.ExportUserData(session_pb2.ExportUserDataRequest(tenant="", user_id=USER))
    err = await status_of(stream.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in err.details()

    s = await create(stub)
    assert (await append(stub, s.session_id, msg("still here"))).last_seq == 1
