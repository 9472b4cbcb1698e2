"""The degradation ladder wired into Generate: as the measured wait grows (tokens the workers
report waiting over their measured speed), each step shows in the response's `degraded` field,
BATCH is held back without passing its deadline, and refusals carry a retry pushback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from tests.integration.router.fakes import CHAT_MODEL, FakeWorker, chat_model, start_fake
from tests.integration.router.helpers import chat_request, collect, router_for, text_of, wait_until

SMALL = "fake-chat-small"
SPEED = 100.0  # tokens/s the fake reports: waiting_tokens / SPEED is the predicted wait
TEXT = "one two three four five six"


@asynccontextmanager
async def ladder(**overrides: Any) -> AsyncIterator[tuple[FakeWorker, Any]]:
    worker = FakeWorker(
        models=[chat_model(CHAT_MODEL, tier="large"), chat_model(SMALL, tier="small")],
        decode_tokens_per_s=SPEED,
    )
    server = await start_fake(worker)
    try:
        async with router_for(
            [server.address],
            degradation_thresholds_s=[1.0, 2.0, 3.0, 4.0, 5.0],
            degraded_max_tokens=2,
            overload_window_s=0,  # the ladder follows the latest report at once
            **overrides,
        ) as stub:
            await wait_for_wait(worker, stub, 0.0)
            yield worker, stub
    finally:
        await server.stop(0)


async def wait_for_wait(worker: FakeWorker, stub: Any, seconds: float) -> None:
    """Make the worker report `seconds` of queued work and wait until the router has seen it."""
    worker.waiting_tokens = int(seconds * SPEED)

    async def seen() -> bool:
        status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=2)
        return any(e.healthy and e.load.waiting_tokens == worker.waiting_tokens for e in status.endpoints)

    await wait_until(seen, what=f"a reported wait of {seconds}s")


def steps(responses: list[Any]) -> list[int]:
    return [d.step for r in responses for d in r.degraded]


def request(priority: int = common_pb2.PRIORITY_STANDARD, **fields: Any) -> router_pb2.GenerateRequest:
    fields.setdefault("max_tokens", 8)
    return chat_request(TEXT, model=CHAT_MODEL, priority=priority, **fields)


async def test_no_load_no_degradation() -> None:
    async with ladder() as (_worker, stub):
        responses = await collect(stub, request(), timeout=5)
        assert text_of(responses) == "echo: " + TEXT and steps(responses) == []


async def test_first_step_caps_max_tokens_of_standard_and_batch_only() -> None:
    async with ladder() as (worker, stub):
        await wait_for_wait(worker, stub, 1.5)
        capped = await collect(stub, request(), timeout=5)
        assert text_of(capped) == "echo: one "
        assert capped[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert steps(capped) == [common_pb2.DEGRADATION_STEP_MAX_TOKENS_CAPPED]
        assert "max_tokens capped at 2" in capped[0].degraded[0].reason
        interactive = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=5)
        assert text_of(interactive) == "echo: " + TEXT and steps(interactive) == []


async def test_second_step_moves_requests_that_allow_it_to_the_smaller_tier() -> None:
    async with ladder() as (worker, stub):
        await wait_for_wait(worker, stub, 2.5)
        moved = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE, allow_fallback=True), timeout=5)
        assert moved[0].model == SMALL
        assert worker.requests[-1].model == SMALL
        assert steps(moved) == [common_pb2.DEGRADATION_STEP_FALLBACK_MODEL]
        kept = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=5)
        assert kept[0].model == CHAT_MODEL and steps(kept) == []


async def test_third_step_answers_exact_repeats_of_greedy_requests_from_the_cache() -> None:
    async with ladder() as (worker, stub):
        first = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=5)
        await wait_for_wait(worker, stub, 3.5)
        sent = len(worker.requests)
        repeat = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=5)
        assert len(worker.requests) == sent  # no worker was asked
        assert text_of(repeat) == text_of(first)
        assert [t for r in repeat for t in r.token_ids] == [t for r in first for t in r.token_ids]
        assert steps(repeat) == [common_pb2.DEGRADATION_STEP_CACHED_REPLY]
        assert repeat[-1].usage.completion_tokens == first[-1].usage.completion_tokens
        # Sampled without a seed: not repeatable, so a worker answers it.
        sampled = request(common_pb2.PRIORITY_INTERACTIVE, sampling=common_pb2.SamplingParams(temperature=1))
        await collect(stub, sampled, timeout=5)
        assert len(worker.requests) == sent + 1


async def test_fourth_step_holds_batch_until_the_load_falls() -> None:
    async with ladder() as (worker, stub):
        await wait_for_wait(worker, stub, 4.5)
        held = asyncio.create_task(collect(stub, request(common_pb2.PRIORITY_BATCH), timeout=10))
        await asyncio.sleep(0.5)
        assert not held.done() and not worker.requests
        standard = await collect(stub, request(), timeout=5)  # not held, but capped
        assert steps(standard) == [common_pb2.DEGRADATION_STEP_MAX_TOKENS_CAPPED]
        await wait_for_wait(worker, stub, 0.0)
        responses = await asyncio.wait_for(held, 5)
        assert text_of(responses) == "echo: " + TEXT


async def test_held_batch_is_refused_with_pushback_before_its_deadline() -> None:
    async with ladder(batch_hold_max_s=0.5) as (worker, stub):
        await wait_for_wait(worker, stub, 4.5)
        # A deadline the predicted wait cannot meet: refused at once, never held.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(common_pb2.PRIORITY_BATCH), timeout=1.0)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 0.5
        assert "the deadline cannot be met" in (err.value.details() or "")
        # One it could meet: held, in its one wait, until the hold budget runs out.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(common_pb2.PRIORITY_BATCH), timeout=5.5)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0.3 < time.monotonic() - started < 1.5
        assert "BATCH held back" in (err.value.details() or "")
        assert int(dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0
        assert not worker.requests


async def test_last_step_refuses_all_but_critical_with_pushback() -> None:
    async with ladder() as (worker, stub):
        await wait_for_wait(worker, stub, 6.0)
        for priority in (common_pb2.PRIORITY_INTERACTIVE, common_pb2.PRIORITY_STANDARD):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request(priority), timeout=5)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 1.0
            pushback = int(dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"])
            assert pushback >= 1000  # the backlog needs seconds to drain below the refusal step
        critical = await collect(stub, request(common_pb2.PRIORITY_CRITICAL), timeout=5)
        assert text_of(critical) == "echo: " + TEXT and steps(critical) == []


async def test_a_deadline_shorter_than_the_predicted_wait_is_refused_at_once() -> None:
    async with ladder() as (worker, stub):
        await wait_for_wait(worker, stub, 3.0)  # the ladder alone would serve INTERACTIVE
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=2.0)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1.0
        assert "the deadline cannot be met" in (err.value.details() or "")
        assert int(dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]) >= 2900
        served = await collect(stub, request(common_pb2.PRIORITY_INTERACTIVE), timeout=5.0)
        assert text_of(served) == "echo: " + TEXT
