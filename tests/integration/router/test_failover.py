"""Mid-stream failover against fake workers: a stream that breaks or stalls continues on another
worker from the tokens already delivered; the client sees each token once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer
from tests.integration.router.fakes import FakeSessionStore, FakeWorker, start_fake, words
from tests.integration.router.helpers import chat_request, router_for, text_of, wait_healthy, wait_until

TEXT = "one two three four five six seven eight"
EXPECTED = "echo: " + TEXT
N_TOKENS = len(words(EXPECTED))


@asynccontextmanager
async def pair(**router: Any) -> AsyncIterator[tuple[list[FakeWorker], list[GrpcServer], Any]]:
    """Workers a and b; b reports more load, so a request goes to a first."""
    workers = [FakeWorker("a", token_delay_s=0.01), FakeWorker("b", running=1, token_delay_s=0.01)]
    servers = [await start_fake(w) for w in workers]
    if router.get("session_address") is True:
        store = FakeSessionStore()
        servers.append(await start_fake(store))
        router["session_address"] = servers[-1].address
    try:
        async with router_for([s.address for s in servers[:2]], **router) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            yield workers, servers, stub
    finally:
        for server in servers:
            await server.stop(0)


async def read_all(stream: Any) -> list[Any]:
    return [resp async for resp in stream]


def token_ids(responses: list[Any]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def failovers(responses: list[Any]) -> list[Any]:
    return [d for r in responses for d in r.degraded if d.step == common_pb2.DEGRADATION_STEP_FAILOVER]


async def started_on_a(workers: list[FakeWorker], stub: router_pb2_grpc.InferenceStub) -> Any:
    """A Generate that has reached worker a and is held there after 3 tokens."""
    workers[0].hold_after = 3
    req = chat_request(TEXT)
    task = asyncio.create_task(read_all(stub.Generate(req, timeout=10)))
    await wait_until(lambda: workers[0].requests, what="request on worker a")
    await wait_until(lambda: any(left for left in workers[0].tokens_left.values()), what="a streaming")
    return req, task


async def test_worker_gone_mid_stream_continues_on_another_from_the_delivered_tokens() -> None:
    async with pair() as (workers, servers, stub):
        req, task = await started_on_a(workers, stub)
        await asyncio.sleep(0.1)
        await servers[0].stop(0)  # the process goes away with the stream open

        responses = await task
        assert text_of(responses) == EXPECTED
        # Every token exactly once, in order: 1000 + position in the fake's reply.
        assert token_ids(responses) == [1000 + i for i in range(N_TOKENS)]
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
        assert responses[-1].usage.completion_tokens == N_TOKENS
        resumed = workers[1].request(req.request_id)
        assert list(resumed.resume_token_ids) == [1000, 1001, 1002]
        (note,) = failovers(responses)
        assert servers[0].address in note.reason and "3 tokens" in note.reason
        assert responses[0].worker == servers[0].address
        assert [r.worker for r in responses if r.worker][1:] == [servers[1].address]


async def test_stalled_stream_moves_after_the_stall_timeout() -> None:
    async with pair(stall_timeout_s=0.3) as (workers, _servers, stub):
        req, task = await started_on_a(workers, stub)
        responses = await asyncio.wait_for(task, 5)  # worker a never sends another token
        assert text_of(responses) == EXPECTED
        assert token_ids(responses) == [1000 + i for i in range(N_TOKENS)]
        assert len(failovers(responses)) == 1
        await wait_until(lambda: req.request_id in workers[0].cancelled, what="a's stream cancelled")


async def test_a_busy_worker_that_still_reports_keeps_a_request_waiting_for_its_first_token() -> None:
    async with pair(stall_timeout_s=0.2) as (workers, _servers, stub):
        workers[0].hold_after = 0
        task = asyncio.create_task(read_all(stub.Generate(chat_request(TEXT), timeout=10)))
        await wait_until(lambda: workers[0].requests, what="request on worker a")
        await asyncio.sleep(0.8)  # well past the stall timeout, but a is alive (reports flow)
        workers[0].release.set()
        responses = await task
        assert text_of(responses) == EXPECTED
        assert not failovers(responses) and not workers[1].requests


async def test_a_hung_worker_loses_its_waiting_request_once_its_reports_stop() -> None:
    async with pair(stall_timeout_s=0.2) as (workers, servers, stub):
        workers[0].hold_after = 0
        task = asyncio.create_task(read_all(stub.Generate(chat_request(TEXT), timeout=10)))
        await wait_until(lambda: workers[0].requests, what="request on worker a")
        workers[0].reports_paused = True  # hung: goes stale after endpoint_stale_s
        responses = await asyncio.wait_for(task, 5)
        assert text_of(responses) == EXPECTED
        assert responses[0].worker == servers[1].address
        assert not failovers(responses)  # nothing had been delivered: a plain retry


async def test_sampled_request_gets_a_seed_so_a_resume_is_exact() -> None:
    async with pair() as (workers, _servers, stub):
        req = chat_request(TEXT, sampling=common_pb2.SamplingParams(temperature=0.7))
        await read_all(stub.Generate(req, timeout=10))
        sent = workers[0].request(req.request_id)
        assert sent.sampling.HasField("seed")


async def test_worker_verdicts_are_not_failed_over() -> None:
    async with pair() as (workers, _servers, stub):
        workers[0].fail_with = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_all(stub.Generate(chat_request(TEXT), timeout=10))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert not workers[1].requests


async def test_no_worker_left_to_continue_is_unavailable_naming_the_failure() -> None:
    async with pair(failover_attempts=2) as (workers, _servers, stub):
        for worker in workers:
            worker.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_all(stub.Generate(chat_request(TEXT), timeout=10))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "failover_attempts=2" in (err.value.details() or "")


async def test_a_stall_with_nowhere_to_go_waits_for_the_slow_worker() -> None:
    worker = FakeWorker("only", token_delay_s=0.01)
    server = await start_fake(worker)
    try:
        async with router_for([server.address], stall_timeout_s=0.2) as stub:
            await wait_healthy(stub, {server.address})
            _, task = await started_on_a([worker], stub)
            await asyncio.sleep(0.8)  # stalled well past the timeout, but no other worker exists
            worker.release.set()
            responses = await task
            assert text_of(responses) == EXPECTED and not failovers(responses)
    finally:
        await server.stop(0)


async def test_a_failed_over_reply_is_recorded_once_and_whole_in_the_session() -> None:
    async with pair(session_address=True) as (workers, servers, stub):
        session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="u"), timeout=5)
        workers[0].hold_after = 3
        req = chat_request(TEXT, session_id=session.session_id)
        task = asyncio.create_task(read_all(stub.Generate(req, timeout=10)))
        await wait_until(lambda: any(left for left in workers[0].tokens_left.values()), what="a streaming")
        await asyncio.sleep(0.1)
        await servers[0].stop(0)
        responses = await task
        assert text_of(responses) == EXPECTED and len(failovers(responses)) == 1
        history = await stub.GetHistory(
            router_pb2.GetHistoryRequest(session_id=session.session_id), timeout=5
        )
        assert [(m.role, m.content) for m in history.messages] == [
            (common_pb2.ROLE_USER, TEXT),
            (common_pb2.ROLE_ASSISTANT, EXPECTED),
        ]


async def test_a_full_worker_passes_the_request_on_and_when_all_are_full_the_caller_gets_pushback() -> None:
    async with pair() as (workers, servers, stub):
        workers[0].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        responses = await read_all(stub.Generate(chat_request(TEXT), timeout=10))
        assert text_of(responses) == EXPECTED and responses[0].worker == servers[1].address
        workers[1].fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_all(stub.Generate(chat_request(TEXT), timeout=10))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no other worker could take the request" in (err.value.details() or "")
        assert int(dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]) >= 100
        # Being full is not an error that ejects a worker.
        workers[0].fail_with = workers[1].fail_with = None
        assert text_of(await read_all(stub.Generate(chat_request(TEXT), timeout=10))) == EXPECTED
