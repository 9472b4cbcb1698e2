"""Retries are gRPC's own (service config): UNAVAILABLE is retried, after the server's
pushback when it sends one; other codes are not; the API key travels on every attempt."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc
import pytest

from infermesh.client import NO_RETRIES, AsyncClient, Client, Overloaded, RetryPolicy, Unavailable
from services.common.server import GrpcServer
from tests.integration.client.fakes import FlakyInference, start_flaky


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyInference, GrpcServer]]:
    servicer, server = await start_flaky()
    yield servicer, server
    await server.stop(0)


def gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals)]


async def test_unavailable_is_retried_until_it_succeeds(flaky: tuple[FlakyInference, GrpcServer]) -> None:
    servicer, server = flaky
    servicer.failures = 2
    retry = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncClient(server.address, retry=retry, timeout=10) as client:
        models = await client.list_models()
    assert models.default_chat_model == "flaky"
    assert len(servicer.arrivals) == 3


async def test_pushback_sets_the_delay_between_attempts(flaky: tuple[FlakyInference, GrpcServer]) -> None:
    servicer, server = flaky
    servicer.failures = 2
    servicer.pushback_ms = 300
    # Without the pushback the backoff would be at most 10 ms.
    retry = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.01)
    async with AsyncClient(server.address, retry=retry, timeout=10) as client:
        await client.list_models()
    assert len(servicer.arrivals) == 3
    assert all(gap >= 0.29 for gap in gaps(servicer.arrivals))


async def test_a_streamed_generate_is_retried_before_its_first_message(
    flaky: tuple[FlakyInference, GrpcServer],
) -> None:
    servicer, server = flaky
    servicer.failures = 1
    retry = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)

    def call() -> str:
        with Client(server.address, retry=retry, timeout=10, api_key="k-123") as client:
            return client.generate("hi").text

    assert await asyncio.to_thread(call) == "ok"
    assert len(servicer.arrivals) == 2
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer k-123"] * 2


async def test_attempts_are_bounded_and_end_in_unavailable(flaky: tuple[FlakyInference, GrpcServer]) -> None:
    servicer, server = flaky
    servicer.failures = 10
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncClient(server.address, retry=retry, timeout=10, api_key="k-9") as client:
        with pytest.raises(Unavailable):
            await client.list_models()
    assert len(servicer.arrivals) == 3
    assert {m.get("authorization") for m in servicer.metadata} == {"Bearer k-9"}


async def test_no_retries_policy_tries_once(flaky: tuple[FlakyInference, GrpcServer]) -> None:
    servicer, server = flaky
    servicer.failures = 1
    async with AsyncClient(server.address, retry=NO_RETRIES, timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.list_models()
    assert len(servicer.arrivals) == 1


async def test_overload_is_not_retried_by_default_and_carries_the_pushback(
    flaky: tuple[FlakyInference, GrpcServer],
) -> None:
    servicer, server = flaky
    servicer.failures = 1
    servicer.code = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.pushback_ms = 1500
    async with AsyncClient(server.address, timeout=10) as client:
        with pytest.raises(Overloaded) as caught:
            await client.list_models()
    assert caught.value.retry_after_ms == 1500
    assert len(servicer.arrivals) == 1


async def test_overload_can_be_made_retryable(flaky: tuple[FlakyInference, GrpcServer]) -> None:
    servicer, server = flaky
    servicer.failures = 1
    servicer.code = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.pushback_ms = 200
    retry = RetryPolicy(retryable_codes=("UNAVAILABLE", "RESOURCE_EXHAUSTED"), initial_backoff_s=0.01)
    async with AsyncClient(server.address, retry=retry, timeout=10) as client:
        await client.list_models()
    assert len(servicer.arrivals) == 2
    assert gaps(servicer.arrivals)[0] >= 0.19
