"""The engine loop with a scripted executor: batching, chunked prefill, cancellation, drain, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.worker.core.block_manager import BlockManager
from services.worker.core.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from services.worker.engine import Engine
from services.worker.request import SamplingParams
from services.worker.sequence import Delta, Finish, GenSequence
from services.worker.step import StepInterrupted


class ScriptedExecutor:
    """Next token = last token of the chunk + 1; records every step as (request id, start, length)
    chunks, and when each pass began and ended. A step takes `step_s` plus `per_sequence_s` for
    each chunk, in ten slices like layers, asking `interrupt` between them."""

    def __init__(self, step_s: float = 0.0, fail_on: int | None = None, per_sequence_s: float = 0.0) -> None:
        self.step_s = step_s
        self.per_sequence_s = per_sequence_s
        self.fail_on = fail_on
        self.steps: list[list[tuple[str, int, int]]] = []
        self.interrupted: list[list[str]] = []
        # Per pass, as the model thread saw it: (began, ended) on time.perf_counter().
        self.times: list[tuple[float, float]] = []

    def execute(
        self,
        out: SchedulerOutput,
        seqs: Mapping[str, GenSequence],
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[str, tuple[int, float | None]]:
        began = time.perf_counter()
        self.steps.append([(seqs[c.request_id].request_id, c.start, len(c.token_ids)) for c in out.chunks])
        try:
            for _ in range(10):
                if interrupt is not None and interrupt():
                    self.interrupted.append([seqs[c.request_id].request_id for c in out.chunks])
                    raise StepInterrupted
                time.sleep((self.step_s + self.per_sequence_s * len(out.chunks)) / 10)
        finally:
            self.times.append((began, time.perf_counter()))
        if self.fail_on is not None and any(c.token_ids[-1] == self.fail_on for c in out.chunks):
            raise RuntimeError("device fell over")
        return {c.request_id: (c.token_ids[-1] + 1, None) for c in out.chunks if c.sample}

    def seconds(self, step: int) -> float:
        began, ended = self.times[step]
        return ended - began

    def chunks_of(self, request_id: str) -> list[tuple[int, int]]:
        return [(start, n) for step in self.steps for rid, start, n in step if rid == request_id]


def decode(ids: Sequence[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def make_seq(
    request_id: str = "r", prompt: Sequence[int] = (1, 2, 3), max_new: int = 4, priority: int = 3
) -> GenSequence:
    return GenSequence(
        priority=priority,
        request_id=request_id,
        prompt_ids=prompt,
        resume_ids=[],
        sampling=SamplingParams(),
        seed=0,
        max_new_tokens=max_new,
        decode=decode,
    )


def make_engine(
    executor: ScriptedExecutor, *, num_blocks: int = 256, block_size: int = 4, **limits: int
) -> Engine:
    scheduler = Scheduler(BlockManager(num_blocks, block_size), SchedulerLimits(**limits))
    return Engine(executor, scheduler)


async def collect(engine: Engine, seq: GenSequence) -> list[Delta]:
    return [d async for d in engine.submit(seq).deltas()]


async def wait_until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def engine_with() -> object:
    engines: list[Engine] = []

    def make(executor: ScriptedExecutor, **kwargs: int) -> Engine:
        engine = make_engine(executor, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def test_tokens_stream_in_order_and_finish_at_length(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor())
    deltas = await collect(engine, make_seq(max_new=3))
    assert [d.token_ids for d in deltas] == [[4], [5], [6]]
    assert "".join(d.text for d in deltas) == "<4><5><6>"
    assert deltas[-1].finish is Finish.LENGTH


async def test_long_prompt_is_prefilled_in_chunks_at_the_right_positions(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor()
    engine = engine_with(executor, max_prefill_chunk=16)
    await collect(engine, make_seq(prompt=range(40), max_new=2))
    assert executor.chunks_of("r") == [(0, 16), (16, 16), (32, 8), (40, 1)]


async def test_concurrent_requests_share_forward_passes(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.002)
    engine = engine_with(executor)
    results = await asyncio.gather(*(collect(engine, make_seq(f"q{i}", max_new=6)) for i in range(8)))
    assert all([t for d in deltas for t in d.token_ids] == [4, 5, 6, 7, 8, 9] for deltas in results)
    # All eight were submitted before the first step: every step carries every one of them.
    assert max(len(step) for step in executor.steps) == 8
    assert len(executor.steps) <= 7


async def test_a_request_joins_a_running_batch_between_steps(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.005)
    engine = engine_with(executor)
    first = asyncio.create_task(collect(engine, make_seq("first", max_new=40)))
    await wait_until(lambda: len(executor.steps) >= 5)
    second = await collect(engine, make_seq("second", max_new=3))
    assert second[-1].finish is Finish.LENGTH
    assert not first.done(), "the second request waited for the first to end"
    assert (await first)[-1].finish is Finish.LENGTH


async def test_an_urgent_request_interrupts_a_lower_priority_pass_and_runs_first(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.2)
    engine = engine_with(executor)
    batch = asyncio.create_task(collect(engine, make_seq("batch", max_new=3, priority=4)))
    await wait_until(lambda: len(executor.steps) == 1)
    started = time.perf_counter()
    urgent = engine.submit(make_seq("urgent", prompt=(7, 8), max_new=2, priority=2))
    first = await anext(urgent.deltas())
    waited = time.perf_counter() - started
    assert first.token_ids == [9]
    # The batch pass was given up, and the urgent prefill ran on its own before the batch's again.
    assert executor.interrupted == [["batch"]]
    assert [rid for rid, _, _ in executor.steps[1]] == ["urgent"]
    assert engine.interrupted_passes == 1
    # Nothing of the interrupted pass counted: the batch request still gets every token once.
    assert [t for d in await batch for t in d.token_ids] == [4, 5, 6]
    # Against passes timed in this test: the urgent token took its own pass and a fraction of a
    # batch pass, not the rest of the batch pass first (that would be most of a whole one more).
    urgent_pass, batch_pass = executor.seconds(1), executor.seconds(2)
    assert waited - urgent_pass < 0.5 * batch_pass, (
        f"the urgent request waited {waited:.3f}s: its own pass {urgent_pass:.3f}s, a batch pass "
        f"{batch_pass:.3f}s; it waited for much of the lower-priority pass"
    )


async def test_a_pass_towards_an_urgent_first_token_is_not_given_up_for_another(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.05)
    engine = engine_with(executor)
    one = asyncio.create_task(collect(engine, make_seq("one", max_new=3, priority=1)))
    await wait_until(lambda: len(executor.steps) == 1)
    two = await collect(engine, make_seq("two", max_new=3, priority=2))
    assert [t for d in two for t in d.token_ids] == [4, 5, 6]
    await one
    assert executor.interrupted == []


async def test_load_reports_the_decode_step_model(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.02, per_sequence_s=0.01)
    engine = engine_with(executor)
    assert (engine.load().decode_step_fixed_s, engine.load().decode_step_per_sequence_s) == (0.0, 0.0)
    await asyncio.gather(*(collect(engine, make_seq(f"q{i}", max_new=3 + 2 * i)) for i in range(4)))
    load = engine.load()
    # Decode steps of 4, 3, 2 and 1 sequences (every chunk one token), as the executor timed them.
    timed: dict[int, list[float]] = {}
    for i, step in enumerate(executor.steps):
        if all(n == 1 for _, _, n in step):
            timed.setdefault(len(step), []).append(executor.seconds(i))
    assert sorted(timed) == [1, 2, 3, 4]
    for batch, seconds in timed.items():
        predicted = load.decode_step_fixed_s + batch * load.decode_step_per_sequence_s
        measured = sum(seconds) / len(seconds)
        assert predicted == pytest.approx(measured, rel=0.2), (batch, predicted, measured)
    # The growth per sequence is half the fixed cost here; the fit tells the two apart.
    assert load.decode_step_per_sequence_s == pytest.approx(0.5 * load.decode_step_fixed_s, rel=0.4)
    assert 1 < load.decode_step_batch < 4  # the batches it was fitted over
    engine.forget_speed()  # what the service does after its warm-up pass
    load = engine.load()
    assert (load.decode_step_fixed_s, load.decode_tokens_per_s, load.prefill_tokens_per_s) == (0, 0, 0)


async def test_abandoned_stream_frees_its_blocks_within_a_step(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor(step_s=0.01)
    engine = engine_with(executor)
    long = engine.submit(make_seq("long", max_new=1000))
    stream = long.deltas()
    await anext(stream)
    assert engine.scheduler.blocks.num_used_blocks > 0
    await stream.aclose()  # what a cancelled RPC does to the generator
    await wait_until(lambda: engine.scheduler.blocks.num_used_blocks == 0, timeout=0.5)
    assert long.seq.finish is Finish.CANCELLED
    assert len(executor.chunks_of("long")) < 10


async def test_two_hundred_cancelled_streams_leave_no_block_in_use(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(step_s=0.001), max_num_seqs=64)
    handles = [engine.submit(make_seq(f"c{i}", prompt=range(1, 2 + i % 30), max_new=500)) for i in range(200)]
    await wait_until(lambda: engine.scheduler.num_running > 0)
    for handle in handles:
        handle.cancel()
    await wait_until(lambda: not engine.scheduler.has_work(), timeout=1.0)
    assert engine.scheduler.blocks.num_used_blocks == 0
    assert engine.load().running == engine.load().waiting == 0


async def test_client_request_ids_need_not_be_unique(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor())
    a, b = await asyncio.gather(
        collect(engine, make_seq("same", prompt=(1,), max_new=2)),
        collect(engine, make_seq("same", prompt=(10,), max_new=2)),
    )
    assert [d.token_ids for d in a] == [[2], [3]]
    assert [d.token_ids for d in b] == [[11], [12]]


async def test_full_queue_is_refused_with_pushback(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(step_s=0.01), max_num_seqs=1, max_waiting=1)
    running = engine.submit(make_seq("a", max_new=50))
    await wait_until(lambda: engine.scheduler.num_running == 1)
    engine.submit(make_seq("b"))
    with pytest.raises(ResourceExhausted) as info:
        engine.submit(make_seq("c"))
    assert info.value.retry_after_ms >= 100
    running.cancel()


async def test_a_sequence_larger_than_the_cache_is_refused_naming_the_limit(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(), num_blocks=4, block_size=4)
    with pytest.raises(InvalidArgument, match="cache holds 16"):
        engine.submit(make_seq(prompt=range(10), max_new=10))


async def test_drain_refuses_new_work_and_finishes_in_flight(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(step_s=0.005))
    in_flight = engine.submit(make_seq("a", max_new=5))
    engine.drain()
    with pytest.raises(Unavailable, match="draining"):
        engine.submit(make_seq("b"))
    deltas = [d async for d in in_flight.deltas()]
    assert deltas[-1].finish is Finish.LENGTH
    await asyncio.wait_for(engine.wait_idle(), 1)
    assert engine.load().draining


async def test_a_failed_forward_pass_fails_its_batch_and_the_engine_goes_on(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(fail_on=5))
    with pytest.raises(RuntimeError, match="device fell over"):
        await collect(engine, make_seq("bad", prompt=(3, 4), max_new=5))
    assert engine.scheduler.blocks.num_used_blocks == 0
    deltas = await collect(engine, make_seq("good", prompt=(10,), max_new=2))
    assert deltas[-1].finish is Finish.LENGTH


async def test_load_counts_running_waiting_and_kv_blocks(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor(step_s=0.01), max_num_seqs=1, num_blocks=64, block_size=4)
    a = engine.submit(make_seq("a", max_new=100))
    b = engine.submit(make_seq("b", prompt=(1, 2), max_new=7))
    await wait_until(lambda: engine.decode_meter.rate > 0)
    load = engine.load()
    assert (load.running, load.waiting, load.waiting_tokens) == (1, 1, 9)
    assert 0 < load.running_tokens < 100
    assert load.kv_blocks_total == 64
    assert 0 < load.kv_blocks_total - load.kv_blocks_free <= 26
    b.cancel()  # a cancelled request still queued is no longer work
    assert (engine.load().waiting, engine.load().waiting_tokens) == (0, 0)
    a.cancel()


async def test_a_repeated_prompt_hits_the_prefix_cache(engine_with) -> None:  # type: ignore[no-untyped-def]
    executor = ScriptedExecutor()
    engine = engine_with(executor)
    prompt = list(range(1, 22))
    await collect(engine, make_seq("first", prompt=prompt, max_new=2))
    await collect(engine, make_seq("again", prompt=prompt, max_new=2))
    # 5 full blocks of 4 cached: the second prefill starts at position 20.
    assert executor.chunks_of("again")[0] == (20, 1)
    assert engine.load().prefix_cache_hit_rate == pytest.approx(20 / 42)


async def test_stop_fails_unfinished_requests() -> None:
    engine = make_engine(ScriptedExecutor(step_s=0.01))
    engine.start()
    handle = engine.submit(make_seq(max_new=1000))
    await asyncio.sleep(0.03)
    await engine.stop()
    with pytest.raises(Unavailable):
        async for _ in handle.deltas():
            pass


async def test_a_request_the_scheduler_refuses_fails_alone_and_the_engine_goes_on(engine_with) -> None:  # type: ignore[no-untyped-def]
    engine = engine_with(ScriptedExecutor())
    with pytest.raises(InvalidArgument, match="at least one token"):
        await collect(engine, make_seq("empty", prompt=()))
    assert engine.alive
    assert (await collect(engine, make_seq("next", max_new=1)))[-1].finish is Finish.LENGTH
