"""Drill 5: restart Postgres during 1,000 appends from 16 writers that retry.

Proves that an acknowledged append survives a database restart and that retries with the same
client message id never store a message twice, even when the append that failed did commit.
Postgres is stopped while appends are in flight (a fast shutdown, which ends every session at
once and rolls back what was in flight, or SIGKILL, a crash that Postgres recovers from its
WAL), kept down for a second and started again on the same port and data; the service must find
it again by itself. Recovery is from the moment Postgres accepts connections again until
the service acknowledged an append.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from infermesh.session.v1 import session_pb2_grpc
from tests.chaos.harness import DrillResult, ThrowawayPostgres, recording, wait_until
from tests.chaos.session_load import AppendLoad, session_env, session_service

DOWN_S = 1.0


@pytest.mark.parametrize(
    ("how", "sig"), [("fast shutdown", signal.SIGINT), ("SIGKILL", signal.SIGKILL)], ids=["shutdown", "kill"]
)
async def test_restart_postgres_during_appends_with_retries(
    tmp_path: Path, log_dir: Path, how: str, sig: int
) -> None:
    postgres = ThrowawayPostgres()
    await postgres.start()
    result = DrillResult("5 postgres restart", "16 writers, 1000 appends", f"{how}, down {DOWN_S:.0f} s")
    running: asyncio.Task[None] | None = None
    with recording(result):
        try:
            env = session_env(postgres.url, tmp_path, db_timeout_s="2", health_interval_s="0.5")
            async with (
                session_service(env, log_dir) as service,
                grpc.aio.insecure_channel(service.address) as channel,
            ):
                load = AppendLoad(session_pb2_grpc.SessionStoreStub(channel), retry=True)
                await load.create_sessions()
                running = asyncio.create_task(load.run())

                await wait_until(lambda: load.done >= 300, timeout=60)
                postgres.stop(sig)
                await asyncio.sleep(DOWN_S)
                await postgres.start()
                back_at = time.monotonic()
                acked_before = len(load.acked)
                result.recovery_s = await wait_until(lambda: len(load.acked) > acked_before, timeout=30)
                await asyncio.wait_for(running, timeout=120)
                verdict = await load.verify()
                assert service.proc is not None and service.proc.poll() is None, service.log_tail()

            retries = sum(not a.ok for a in load.attempts)
            result.total, result.completed, result.failed = load.total, len(load.acked), len(load.gave_up)
            result.lost, result.duplicates = verdict.lost, verdict.duplicates
            result.note = f"{retries} retried attempts"
            result.passed = verdict.clean and len(load.acked) == load.total
            assert verdict.clean, verdict
            assert len(load.acked) == load.total and not load.gave_up, load.errors
            # The outage was felt: otherwise the drill proved nothing.
            assert retries > 0 and any(a.at >= back_at for a in load.attempts)
        finally:
            if running is not None:
                running.cancel()
            postgres.remove()
