"""Generate through the router: streamed relay, placement, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.worker.v1 import worker_pb2
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import CHAT_MODEL, FakeWorker, start_fake
from tests.integration.router.helpers import (
    chat_request,
    collect,
    start_router,
    text_of,
    wait_healthy,
    wait_idle,
    wait_until,
)


def sent_to_worker(mesh: Mesh, request_id: str) -> worker_pb2.GenerateRequest:
    """The request the router sent on to whichever fake worker got it."""
    (sent,) = [r for w in mesh.workers for r in w.requests if r.request_id == request_id]
    return sent


async def test_reply_is_relayed_in_order_with_first_message_metadata(mesh: Mesh) -> None:
    req = chat_request("the quick brown fox")
    responses = await collect(mesh.stub, req)

    assert text_of(responses) == "echo: the quick brown fox"
    assert len(responses) == 5  # one per fake token, not buffered into one
    assert [r.token_ids[0] for r in responses] == [1000, 1001, 1002, 1003, 1004]
    first = responses[0]
    assert first.model == CHAT_MODEL
    assert first.worker in {s.address for s in mesh.worker_servers}
    assert all(r.request_id == req.request_id for r in responses)
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert responses[-1].usage.completion_tokens == 5
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


async def test_tokens_arrive_while_the_worker_is_still_generating(mesh: Mesh) -> None:
    for worker in mesh.workers:
        worker.hold_after = 2
        worker.release.clear()
    try:
        call = mesh.stub.Generate(chat_request("one two three four"), timeout=5)
        first = await asyncio.wait_for(call.read(), timeout=2)
        second = await asyncio.wait_for(call.read(), timeout=2)
        assert first.text + second.text == "echo: one "
        # The worker is blocked: nothing more may arrive until it is released.
        pending = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.2)
        assert not pending.done()
        for worker in mesh.workers:
            worker.release.set()
        rest = [await pending]
        while (resp := await call.read()) is not grpc.aio.EOF:
            rest.append(resp)
        assert "".join(r.text for r in rest) == "two three four"
    finally:
        for worker in mesh.workers:
            worker.hold_after = None


async def test_request_id_is_generated_and_reaches_the_worker(mesh: Mesh) -> None:
    responses = await collect(mesh.stub, chat_request("hi", request_id=""))
    request_id = responses[0].request_id
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    worker = next(
        w for w, s in zip(mesh.workers, mesh.worker_servers, strict=True) if s.address == responses[0].worker
    )
    sent = worker.request(request_id)
    assert sent.model == CHAT_MODEL
    assert sent.max_tokens == 256  # the router's default_max_tokens


async def test_request_fields_are_passed_to_the_worker(mesh: Mesh) -> None:
    req = chat_request(
        "a b c d e f",
        max_tokens=3,
        stop=["zz"],
        sampling=common_pb2.SamplingParams(temperature=0.7, top_p=0.9, seed=11),
        priority=common_pb2.PRIORITY_INTERACTIVE,
    )
    responses = await collect(mesh.stub, req)
    assert text_of(responses) == "echo: a b "
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    sent = next(
        w.request(req.request_id)
        for w in mesh.workers
        if req.request_id in [r.request_id for r in w.requests]
    )
    assert sent.max_tokens == 3
    assert list(sent.stop) == ["zz"]
    assert sent.sampling.seed == 11 and sent.sampling.HasField("temperature")
    assert sent.priority == common_pb2.PRIORITY_INTERACTIVE
    assert [m.content for m in sent.messages] == ["a b c d e f"]


async def test_raw_prompt_is_sent_without_messages(mesh: Mesh) -> None:
    req = router_pb2.GenerateRequest(prompt="once upon", request_id=uuid.uuid4().hex)
    assert text_of(await collect(mesh.stub, req)) == "echo: once upon"
    sent = next(
        w.request(req.request_id)
        for w in mesh.workers
        if req.request_id in [r.request_id for r in w.requests]
    )
    assert sent.prompt == "once upon" and not sent.messages


async def test_equal_workers_share_requests_round_robin(mesh: Mesh) -> None:
    # Streams of earlier tests may still show in the workers' latest reports; from a busier
    # worker, placement rightly steers away, so start from two idle equals.
    await wait_idle(mesh.stub, {s.address for s in mesh.worker_servers})
    used = [(await collect(mesh.stub, chat_request("x")))[0].worker for _ in range(4)]
    assert set(used) == {s.address for s in mesh.worker_servers}, used


async def test_worker_invalid_argument_is_relayed_with_its_message(mesh: Mesh) -> None:
    long_text = "word " * 600  # more than the fake model's 512-token context
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(mesh.stub, chat_request(long_text, max_tokens=10))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed the context length 512" in (err.value.details() or "")


async def test_client_deadline_reaches_the_worker_and_fails_fast() -> None:
    slow = FakeWorker("slow", token_delay_s=1.0)
    slow_server = await start_fake(slow)
    router = await start_router(worker_addresses=[slow_server.address])
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {slow_server.address})
            req = chat_request("slow please")
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, req, timeout=0.3)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.0
            # The worker's own call ran under the propagated deadline and was cut off too.
            await asyncio.sleep(0.2)
            assert req.request_id in slow.cancelled
            assert req.request_id not in slow.finished

            # The `deadline` field counts as well when it is the earlier one.
            req = chat_request("slow again")
            req.deadline.FromNanoseconds(time.time_ns() + 300_000_000)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, req, timeout=10)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.0

            # A deadline already in the past fails before any worker is called.
            req = chat_request("too late")
            req.deadline.FromNanoseconds(time.time_ns() - 1_000_000_000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, req, timeout=10)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert req.request_id not in [r.request_id for r in slow.requests]
    finally:
        await router.stop(0)
        await slow_server.stop(0)


async def test_client_cancellation_cancels_the_worker_call(mesh: Mesh) -> None:
    for worker in mesh.workers:
        worker.hold_after = 1
        worker.release.clear()
    try:
        req = chat_request("cancel me soon")
        call = mesh.stub.Generate(req, timeout=5)
        await asyncio.wait_for(call.read(), timeout=2)
        call.cancel()
        await wait_until(
            lambda: any(req.request_id in w.cancelled for w in mesh.workers),
            timeout=2,
            what="worker cancelled",
        )
    finally:
        for worker in mesh.workers:
            worker.hold_after = None
            worker.release.set()
