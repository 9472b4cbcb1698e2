"""The engine loop with a scripted runner: ordering, chunked prefill, cancellation, drain, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from services.common.errors import ResourceExhausted, Unavailable
from services.worker.engine import Engine
from services.worker.request import SamplingParams
from services.worker.sequence import Delta, Finish, GenSequence


class ScriptedRunner:
    """Next token = last token + 1; records every forward pass it was asked for."""

    def __init__(self, step_s: float = 0.0, fail_on: int | None = None) -> None:
        self.step_s = step_s
        self.fail_on = fail_on
        self.calls: list[tuple[str, str, int, int]] = []

    def prefill(self, token_ids: Sequence[int], start: int) -> None:
        self.calls.append(("prefill", "", start, len(token_ids)))

    def sample_next(self, seq: GenSequence, token_ids: Sequence[int], start: int) -> tuple[int, float | None]:
        self.calls.append(("sample", seq.request_id, start, len(token_ids)))
        time.sleep(self.step_s)
        if self.fail_on is not None and token_ids[-1] == self.fail_on:
            raise RuntimeError("device fell over")
        return token_ids[-1] + 1, None


def decode(ids: Sequence[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def make_seq(request_id: str = "r", prompt: Sequence[int] = (1, 2, 3), max_new: int = 4) -> GenSequence:
    return GenSequence(
        request_id=request_id,
        prompt_ids=prompt,
        resume_ids=[],
        sampling=SamplingParams(),
        seed=0,
        max_new_tokens=max_new,
        decode=decode,
    )


async def collect(engine: Engine, seq: GenSequence) -> list[Delta]:
    return [d async for d in engine.submit(seq).deltas()]


@pytest.fixture
async def engine_with() -> object:
    engines: list[Engine] = []

    def make(runner: ScriptedRunner, **kwargs: int) -> Engine:
        engine = Engine(runner, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def test_tokens_stream_in_order_and_finish_at_length(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedRunner())
    deltas = await collect(engine, make_seq(max_new=3))
    assert [d.token_ids for d in deltas] == [[4], [5], [6]]
    assert "".join(d.text for d in deltas) == "<4><5><6>"
    assert deltas[-1].finish is Finish.LENGTH


async def test_long_prompt_is_prefilled_in_chunks_at_the_right_positions(engine_with) -> None:  # type: ignore[no-untyped-def]
    runner = ScriptedRunner()
    engine = engine_with(runner, prefill_chunk_tokens=16)
    await collect(engine, make_seq(prompt=range(40), max_new=2))
    assert runner.calls == [
        ("prefill", "", 0, 16),
        ("prefill", "", 16, 16),
        ("sample", "r", 32, 8),
        ("sample", "r", 40, 1),
    ]


async def test_requests_run_one_after_another(engine_with) -> None:  # type: ignore[no-untyped-def]
    runner = ScriptedRunner()
    engine = engine_with(runner)
    await asyncio.gather(collect(engine, make_seq("a")), collect(engine, make_seq("b")))
    order = [rid for kind, rid, _, _ in runner.calls if kind == "sample"]
    assert order == ["a"] * 4 + ["b"] * 4


async def test_abandoned_stream_stops_generating_and_frees_the_engine(engine_with) -> None:  # type: ignore[no-untyped-def]
    runner = ScriptedRunner(step_s=0.01)
    engine = engine_with(runner)
    long = engine.submit(make_seq("long", max_new=10_000))
    stream = long.deltas()
    await anext(stream)
    await stream.aclose()  # what a cancelled RPC does to the generator
    started = time.perf_counter()
    deltas = await collect(engine, make_seq("next", max_new=2))
    assert deltas[-1].finish is Finish.LENGTH
    assert time.perf_counter() - started < 1.0
    assert sum(1 for _, rid, _, _ in runner.calls if rid == "long") < 10
    assert long.seq.finish is Finish.CANCELLED


async def test_full_queue_is_refused_with_pushback(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedRunner(step_s=0.01), max_waiting=1)
    running = engine.submit(make_seq("a", max_new=50))
    await asyncio.sleep(0.05)  # "a" leaves the queue for the running slot
    engine.submit(make_seq("b"))
    with pytest.raises(ResourceExhausted) as info:
        engine.submit(make_seq("c"))
    assert info.value.retry_after_ms >= 100
    running.cancel()


async def test_drain_refuses_new_work_and_finishes_in_flight(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedRunner(step_s=0.005))
    in_flight = engine.submit(make_seq("a", max_new=5))
    engine.drain()
    with pytest.raises(Unavailable, match="draining"):
        engine.submit(make_seq("b"))
    deltas = [d async for d in in_flight.deltas()]
    assert deltas[-1].finish is Finish.LENGTH
    await asyncio.wait_for(engine.wait_idle(), 1)
    assert engine.load().draining


async def test_runner_failure_fails_that_request_only(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedRunner(fail_on=5))
    with pytest.raises(RuntimeError, match="device fell over"):
        await collect(engine, make_seq("bad", prompt=(3, 4), max_new=5))
    deltas = await collect(engine, make_seq("good", prompt=(10,), max_new=2))
    assert deltas[-1].finish is Finish.LENGTH


async def test_load_counts_running_and_waiting(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedRunner(step_s=0.01))
    a = engine.submit(make_seq("a", max_new=100))
    b = engine.submit(make_seq("b", prompt=(1, 2), max_new=7))
    await asyncio.sleep(0.05)
    load = engine.load()
    assert (load.running, load.waiting, load.waiting_tokens) == (1, 1, 9)
    assert 0 < load.running_tokens < 100
    assert load.decode_tokens_per_s > 0
    b.cancel()  # a cancelled request still queued is no longer work
    assert (engine.load().waiting, engine.load().waiting_tokens) == (0, 0)
    a.cancel()


async def test_stop_fails_unfinished_requests() -> None:
    engine = Engine(ScriptedRunner(step_s=0.01))
    engine.start()
    handle = engine.submit(make_seq(max_new=1000))
    await asyncio.sleep(0.03)
    await engine.stop()
    with pytest.raises(Unavailable):
        async for _ in handle.deltas():
            pass
