"""The health probe with a fake embedding: verdicts, reports on change, pauses while draining."""

from __future__ import annotations

import asyncio

import pytest

from services.embedder.health import HealthProbe


class FakeEngine:
    """`embed` answers, hangs or raises as told; `batches` counts what the probe is told finished."""

    def __init__(self) -> None:
        self.batches = 0
        self.mode = "ok"
        self.draining = False
        self.reports: list[bool] = []
        self.reported = asyncio.Event()

    async def embed(self) -> None:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "raise":
            raise RuntimeError("model thread died")
        self.batches += 1

    async def report(self, serving: bool) -> None:
        self.reports.append(serving)
        self.reported.set()

    async def reports_become(self, expected: list[bool]) -> None:
        async with asyncio.timeout(5):
            while self.reports != expected:
                self.reported.clear()
                await self.reported.wait()


def make_probe(engine: FakeEngine, *, interval_s: float = 0.01, timeout_s: float = 0.05) -> HealthProbe:
    return HealthProbe(
        engine.embed,
        lambda: engine.batches,
        engine.report,
        interval_s=interval_s,
        timeout_s=timeout_s,
        paused=lambda: engine.draining,
    )


async def test_finished_batches_count_as_alive_without_probing() -> None:
    engine = FakeEngine()
    engine.mode = "hang"
    probe = make_probe(engine)
    engine.batches = 3
    assert await probe.check(seen=1)
    assert probe.probes == 0


@pytest.mark.parametrize(("mode", "healthy"), [("ok", True), ("hang", False), ("raise", False)])
async def test_an_idle_engine_is_probed_with_a_real_embedding(mode: str, healthy: bool) -> None:
    engine = FakeEngine()
    engine.mode = mode
    probe = make_probe(engine)
    assert await probe.check(seen=0) is healthy
    assert probe.probes == 1


async def test_a_probe_queued_behind_finishing_batches_is_alive() -> None:
    engine = FakeEngine()
    engine.mode = "hang"
    probe = make_probe(engine, timeout_s=0.1)

    async def other_batches_finish() -> None:
        await asyncio.sleep(0.02)
        engine.batches += 1

    finishing = asyncio.create_task(other_batches_finish())
    assert await probe.check(seen=0)
    await finishing


async def test_reports_not_serving_when_stuck_and_serving_once_it_answers_again() -> None:
    engine = FakeEngine()
    probe = make_probe(engine)
    probe.start()
    try:
        await asyncio.sleep(0.1)
        assert engine.reports == []  # healthy all along: nothing to report
        engine.mode = "hang"
        await engine.reports_become([False])
        engine.mode = "ok"
        await engine.reports_become([False, True])
    finally:
        await probe.stop()
    assert probe.healthy


async def test_nothing_is_probed_or_reported_while_draining() -> None:
    engine = FakeEngine()
    engine.mode = "hang"
    engine.draining = True
    probe = make_probe(engine)
    probe.start()
    await asyncio.sleep(0.2)
    await probe.stop()
    assert (probe.probes, engine.reports) == (0, [])


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s=0"):
        make_probe(FakeEngine(), interval_s=0)
