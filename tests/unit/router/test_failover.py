"""Failover on plain fakes (no server, no network): a broken or stalled worker stream moves to
another worker that resumes from the tokens already delivered, with the same seed, and the
caller sees every token once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2
from services.common.errors import ResourceExhausted, Unavailable
from services.router.core.domain import DegradationStep, Sampling, WorkerRequest
from services.router.core.placement import Ask
from services.router.failover import Failover, pin_seed


def error(code: grpc.StatusCode, details: str = "", pushback_ms: int | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if pushback_ms is not None:
        trailing.add("grpc-retry-pushback-ms", str(pushback_ms))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def token(i: int) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(text=f"t{i} ", token_ids=[i])


def last(i: int) -> worker_pb2.GenerateResponse:
    resp = token(i)
    resp.finish_reason = common_pb2.FINISH_REASON_LENGTH
    return resp


HANG = object()  # the stream waits here until the call is cancelled (or `go` is set)


@dataclass
class Script:
    """What one worker's Generate stream does: messages, then EOF, an error or a hang."""

    messages: Sequence[Any]
    go: asyncio.Event = field(default_factory=asyncio.Event)


class FakeCall:
    def __init__(self, script: Script) -> None:
        self._items = list(script.messages)
        self._go = script.go
        self.cancelled = False

    async def read(self) -> Any:
        if self.cancelled:
            raise asyncio.CancelledError
        if not self._items:
            return grpc.aio.EOF
        item = self._items.pop(0)
        if item is HANG:
            waiter = asyncio.ensure_future(self._go.wait())
            self._waiter = waiter
            await waiter
            return await self.read()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True
        waiter = getattr(self, "_waiter", None)
        if waiter is not None:
            waiter.cancel()


@dataclass
class Placed:
    address: str


class FakeRegistry:
    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.errors: list[str] = []

    def is_usable(self, address: str, now: float) -> bool:
        return True

    def candidates(
        self, kind: Any, model_id: str, now: float, exclude: frozenset[str] = frozenset()
    ) -> list[str]:
        return [a for a in self.addresses if a not in exclude]

    def on_success(self, address: str) -> None:
        pass

    def on_error(self, address: str, now: float) -> bool:
        self.errors.append(address)
        return False


class FakeEndpoints:
    """Places on the first worker not excluded; each worker plays its scripts in turn."""

    def __init__(self, scripts: dict[str, list[Script]]) -> None:
        self.scripts = scripts
        self.registry = FakeRegistry(list(scripts))
        self.sent: list[tuple[str, worker_pb2.GenerateRequest]] = []
        self.released: list[str] = []
        self.calls: list[FakeCall] = []

    def clock(self) -> float:
        return asyncio.get_running_loop().time()

    def place(self, kind: Any, model_id: str, exclude: frozenset[str], ask: Ask) -> Placed:
        free = self.registry.candidates(kind, model_id, 0.0, exclude)
        if not free:
            raise Unavailable(f"model {model_id!r} has no healthy worker")
        return Placed(free[0])

    def release(self, placement: Placed) -> None:
        self.released.append(placement.address)

    def stub(self, address: str) -> Any:
        endpoints = self

        class Stub:
            def Generate(self, req: worker_pb2.GenerateRequest, timeout: float | None = None) -> FakeCall:
                sent = worker_pb2.GenerateRequest()
                sent.CopyFrom(req)
                endpoints.sent.append((address, sent))
                call = FakeCall(endpoints.scripts[address].pop(0))
                endpoints.calls.append(call)
                return call

        return Stub()


def sampled_request(max_tokens: int = 5) -> WorkerRequest:
    return WorkerRequest("r1", "m", max_tokens, prompt="hi", sampling=Sampling(temperature=0.8))


async def relay(endpoints: FakeEndpoints, req: WorkerRequest, **kwargs: Any) -> list[Any]:
    failover = Failover(endpoints, stall_timeout_s=kwargs.pop("stall_timeout_s", 5.0), attempts=3)  # type: ignore[arg-type]
    return [r async for r in failover.stream(req, Ask(), lambda: None)]


async def test_a_broken_stream_resumes_elsewhere_from_the_delivered_tokens_with_the_same_seed() -> None:
    endpoints = FakeEndpoints(
        {
            "a": [Script([token(1), token(2), token(3), error(grpc.StatusCode.UNAVAILABLE, "gone")])],
            "b": [Script([token(4), last(5)])],
        }
    )
    relayed = await relay(endpoints, sampled_request())

    assert [list(r.delta.token_ids) for r in relayed] == [[1], [2], [3], [4], [5]]
    assert [r.address for r in relayed] == ["a", "a", "a", "b", "b"]
    (_, first), (_, resumed) = endpoints.sent
    assert list(resumed.resume_token_ids) == [1, 2, 3]
    assert first.sampling.seed == resumed.sampling.seed != 0
    moved = [r.moved for r in relayed if r.moved is not None]
    assert len(moved) == 1 and relayed[3].moved is moved[0]
    assert moved[0].step is DegradationStep.FAILOVER and "after 3 tokens" in moved[0].reason
    assert endpoints.registry.errors == ["a"]
    assert sorted(endpoints.released) == ["a", "b"]


async def test_a_stalled_stream_moves_when_another_worker_can_take_it() -> None:
    endpoints = FakeEndpoints({"a": [Script([token(1), HANG])], "b": [Script([last(2)])]})
    relayed = await asyncio.wait_for(relay(endpoints, sampled_request(), stall_timeout_s=0.2), 10)

    assert [list(r.delta.token_ids) for r in relayed] == [[1], [2]]
    assert relayed[1].moved is not None and "stalled" in relayed[1].moved.reason
    assert list(endpoints.sent[1][1].resume_token_ids) == [1]
    assert endpoints.calls[0].cancelled


async def test_a_slow_worker_is_kept_when_no_other_could_continue() -> None:
    script = Script([token(1), HANG, last(2)])
    endpoints = FakeEndpoints({"a": [script]})
    task = asyncio.ensure_future(relay(endpoints, sampled_request(), stall_timeout_s=0.1))
    await asyncio.sleep(0.5)  # five stall timeouts pass with nowhere to move
    assert not task.done()
    script.go.set()
    relayed = await asyncio.wait_for(task, 10)
    assert [list(r.delta.token_ids) for r in relayed] == [[1], [2]]
    assert len(endpoints.sent) == 1


async def test_full_workers_are_refused_with_their_pushback() -> None:
    full = error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", pushback_ms=750)
    endpoints = FakeEndpoints({"a": [Script([full])], "b": [Script([full])]})
    with pytest.raises(ResourceExhausted) as info:
        await relay(endpoints, sampled_request())
    assert info.value.retry_after_ms == 750
    assert "no other worker could take the request" in info.value.message
    assert endpoints.registry.errors == []  # busy is not broken: nobody is ejected for it


async def test_the_workers_own_verdict_is_not_failed_over() -> None:
    endpoints = FakeEndpoints(
        {
            "a": [Script([error(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")])],
            "b": [Script([last(1)])],
        }
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await relay(endpoints, sampled_request())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [a for a, _ in endpoints.sent] == ["a"]


def test_only_sampled_requests_without_a_seed_get_one() -> None:
    greedy = WorkerRequest("r1", "m", 5, prompt="hi")
    assert pin_seed(greedy).sampling.seed is None
    seeded = replace(sampled_request(), sampling=Sampling(temperature=0.8, seed=7))
    assert pin_seed(seeded).sampling.seed == 7
    assert pin_seed(sampled_request()).sampling.seed is not None
