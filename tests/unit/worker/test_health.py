"""The health probe on a scripted engine: a blocked model thread turns health off, release turns it on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping

from services.worker.core.scheduler import SchedulerOutput
from services.worker.engine import Engine
from services.worker.health import HealthProbe
from services.worker.sequence import GenSequence
from tests.unit.worker.test_engine import ScriptedExecutor, collect, make_engine, make_seq

INTERVAL = 0.05
TIMEOUT = 0.1


class BlockableRunner(ScriptedExecutor):
    """A scripted executor whose forward passes wait while `gate` is closed, like a wedged model thread."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def execute(
        self,
        out: SchedulerOutput,
        seqs: Mapping[str, GenSequence],
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[str, tuple[int, float | None]]:
        self.gate.wait()
        return super().execute(out, seqs, interrupt)


class Reports:
    def __init__(self) -> None:
        self.values: list[bool] = []
        self.changed = asyncio.Event()

    async def __call__(self, serving: bool) -> None:
        self.values.append(serving)
        self.changed.set()

    async def next(self, within: float) -> bool:
        await asyncio.wait_for(self.changed.wait(), within)
        self.changed.clear()
        return self.values[-1]


@contextlib.asynccontextmanager
async def probed(runner: ScriptedExecutor) -> AsyncIterator[tuple[Engine, HealthProbe, Reports]]:
    """A started engine on `runner` with a started probe; both stopped after, the gate opened first."""
    engine = make_engine(runner)
    engine.start()
    reports = Reports()
    probe = HealthProbe(
        engine, lambda: make_seq("health-probe", max_new=1), reports, interval_s=INTERVAL, timeout_s=TIMEOUT
    )
    probe.start()
    try:
        yield engine, probe, reports
    finally:
        if isinstance(runner, BlockableRunner):
            runner.gate.set()
        await probe.stop()
        await engine.stop()


async def test_blocked_model_thread_turns_health_off_and_release_turns_it_back_on() -> None:
    runner = BlockableRunner()
    async with probed(runner) as (engine, probe, reports):
        # An idle, working engine: probes pass and nothing changes.
        await asyncio.sleep(5 * INTERVAL)
        assert reports.values == []
        assert len(runner.chunks_of("health-probe")) >= 2
        runner.gate.clear()
        # Slack over interval+timeout for a loaded machine; the probe reports as soon as it knows.
        assert await reports.next(within=20 * (INTERVAL + TIMEOUT)) is False
        assert probe.healthy is False
        runner.gate.set()
        assert await reports.next(within=20 * (INTERVAL + TIMEOUT)) is True
        assert probe.healthy is True
        # And the engine serves real requests again.
        deltas = await collect(engine, make_seq(max_new=2))
        assert [d.token_ids for d in deltas] == [[4], [5]]


async def test_busy_engine_is_not_probed_and_stays_healthy() -> None:
    runner = ScriptedExecutor(step_s=INTERVAL / 5)
    async with probed(runner) as (engine, probe, reports):
        # About 20 intervals of steady decoding: progress is the proof, no probe needed.
        await collect(engine, make_seq(max_new=100))
        assert reports.values == []
        assert probe.healthy is True
        assert len(runner.chunks_of("health-probe")) <= 3


async def test_draining_engine_is_never_reported_healthy_again() -> None:
    runner = BlockableRunner()
    async with probed(runner) as (engine, probe, reports):
        runner.gate.clear()
        assert await reports.next(within=20 * (INTERVAL + TIMEOUT)) is False
        engine.drain()
        runner.gate.set()
        await asyncio.sleep(10 * INTERVAL)
        assert reports.values == [False]
        assert probe.healthy is False
