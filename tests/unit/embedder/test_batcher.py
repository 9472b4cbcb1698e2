"""The batching actor with a fake encoder: merging, routing, threads, errors, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from services.common.errors import Unavailable
from services.embedder.batcher import Batcher


class FakeEncoder:
    """Records each call; optionally blocks (like a real forward pass) or fails."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail_on: str | None = None

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        self.threads.add(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("encoder blew up")
        return [f"vec({t})" for t in texts]


@pytest.fixture
def encoder() -> FakeEncoder:
    return FakeEncoder()


async def started(
    encoder: FakeEncoder, *, max_batch_tokens: int = 1000, max_wait_s: float = 0.05
) -> Batcher[str]:
    batcher: Batcher[str] = Batcher(encoder, max_batch_tokens=max_batch_tokens, max_wait_s=max_wait_s)
    batcher.start()
    return batcher


@pytest.fixture
async def batcher(encoder: FakeEncoder) -> AsyncIterator[Batcher[str]]:
    b = await started(encoder)
    yield b
    await b.close()


def texts_of(name: str, n: int) -> list[str]:
    return [f"{name}{i}" for i in range(n)]


async def test_concurrent_callers_share_one_encode_call_and_get_their_own_vectors(
    batcher: Batcher[str], encoder: FakeEncoder
) -> None:
    requests = {name: texts_of(name, n) for name, n in zip("abcdefghij", range(1, 11), strict=True)}
    results = await asyncio.gather(*(batcher.submit(t, [1] * len(t)) for t in requests.values()))
    for texts, vectors in zip(requests.values(), results, strict=True):
        assert vectors == [f"vec({t})" for t in texts]
    assert len(encoder.calls) == 1
    assert len(encoder.calls[0]) == 55


async def test_token_budget_splits_work_into_several_calls(encoder: FakeEncoder) -> None:
    batcher = await started(encoder, max_batch_tokens=40, max_wait_s=0.01)
    try:
        results = await asyncio.gather(*(batcher.submit(texts_of(n, 3), [10] * 3) for n in "abcd"))
    finally:
        await batcher.close()
    assert [len(c) for c in encoder.calls] == [4, 4, 4]
    assert [c for call in encoder.calls for c in call] == [t for n in "abcd" for t in texts_of(n, 3)]
    assert results[2] == ["vec(c0)", "vec(c1)", "vec(c2)"]


async def test_a_caller_arriving_within_max_wait_joins_the_batch(encoder: FakeEncoder) -> None:
    batcher = await started(encoder, max_wait_s=0.5)
    try:
        first = asyncio.create_task(batcher.submit(["early"], [1]))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        late = await batcher.submit(["late"], [1])
        assert await first == ["vec(early)"]
    finally:
        await batcher.close()
    assert late == ["vec(late)"]
    assert encoder.calls == [["early", "late"]]
    # It ran when the first caller's wait was up (0.3 s later), not a full max_wait after the second.
    assert time.monotonic() - start < 0.45


async def test_encode_runs_off_the_event_loop(encoder: FakeEncoder) -> None:
    encoder.delay_s = 0.3
    batcher = await started(encoder, max_wait_s=0.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        assert await batcher.submit(["slow"], [1]) == ["vec(slow)"]
    finally:
        tick_task.cancel()
        await batcher.close()
    assert threading.get_ident() not in encoder.threads
    assert ticks >= 10  # the loop kept turning while the encoder slept for 0.3 s


async def test_an_encoder_error_reaches_that_batch_only(batcher: Batcher[str], encoder: FakeEncoder) -> None:
    encoder.fail_on = "bad"
    with pytest.raises(RuntimeError, match="encoder blew up"):
        await batcher.submit(["good", "bad"], [1, 1])
    encoder.fail_on = None
    assert await batcher.submit(["after"], [1]) == ["vec(after)"]


async def test_a_cancelled_caller_leaves_the_queue(encoder: FakeEncoder) -> None:
    batcher = await started(encoder, max_wait_s=0.2)
    try:
        gone = asyncio.create_task(batcher.submit(["gone"], [1]))
        await asyncio.sleep(0.01)
        assert batcher.load().waiting == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.load().waiting == 0
        assert await batcher.submit(["kept"], [1]) == ["vec(kept)"]
    finally:
        await batcher.close()
    assert encoder.calls == [["kept"]]


async def test_load_counts_waiting_running_and_throughput(encoder: FakeEncoder) -> None:
    encoder.delay_s = 0.3
    batcher = await started(encoder, max_wait_s=0.0)
    try:
        first = asyncio.create_task(batcher.submit(["a", "b"], [3, 5]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(["c"], [4]))
        await asyncio.sleep(0.01)
        load = batcher.load()
        assert (load.running, load.running_tokens, load.waiting, load.waiting_tokens) == (2, 10, 1, 4)
        await asyncio.gather(first, second)
        load = batcher.load()
        assert (load.running, load.waiting, load.batches) == (0, 0, 2)
        assert load.batch_sizes == {2: 1, 1: 1}
        assert load.items_per_s == pytest.approx(3 / 10.0)
    finally:
        await batcher.close()


async def test_drain_waits_for_queued_and_running_work(encoder: FakeEncoder) -> None:
    encoder.delay_s = 0.1
    batcher = await started(encoder, max_wait_s=0.0)
    try:
        pending = [asyncio.create_task(batcher.submit([t], [1])) for t in ("x", "y")]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(batcher.drain(), timeout=2)
        assert all(task.done() for task in pending)
        assert batcher.load().waiting == 0
    finally:
        await batcher.close()


async def test_close_answers_waiting_callers_unavailable_and_refuses_new_work(encoder: FakeEncoder) -> None:
    batcher = await started(encoder, max_wait_s=10.0)
    waiting = asyncio.create_task(batcher.submit(["never"], [1]))
    await asyncio.sleep(0.01)
    await batcher.close()
    with pytest.raises(Unavailable, match="shut down"):
        await waiting
    with pytest.raises(Unavailable, match="not running"):
        await batcher.submit(["late"], [1])
    assert encoder.calls == []
