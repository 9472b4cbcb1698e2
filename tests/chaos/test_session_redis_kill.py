"""Drill 4: SIGKILL Redis during 1,000 appends from 16 writers.

Proves that Redis is only a cache: appends keep succeeding from Postgres while it is gone (at
least 99% of those tried meanwhile, with no retries), nothing acknowledged is lost or reordered,
and once Redis is back the service fills it again by itself. The writers read a window after
every append, so the cache is in use when Redis dies.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from tests.chaos.harness import DrillResult, ThrowawayPostgres, ThrowawayRedis, recording, wait_until
from tests.chaos.session_load import TENANT, AppendLoad, session_env, session_service

PREFIX = "chaos"


async def cached(url: str, session_id: str = "") -> int:
    """Cache entries in Redis under the drill's prefix (of one session, if given): version markers
    (written by every append) and windows (by reads)."""
    client = aioredis.Redis.from_url(url, socket_timeout=1)
    try:
        count = 0
        async for key in client.scan_iter(match=f"{PREFIX}:w:*"):
            if not session_id or key.decode().endswith(f":{session_id}"):
                count += len(await client.hkeys(key))
        return count
    finally:
        await client.aclose()


async def test_sigkill_redis_during_appends(tmp_path: Path, log_dir: Path) -> None:
    postgres, redis_server = ThrowawayPostgres(), ThrowawayRedis()
    await postgres.start()
    await redis_server.start()
    result = DrillResult("4 redis SIGKILL", "16 writers, 1000 appends", "SIGKILL redis, restart")
    running: asyncio.Task[None] | None = None
    with recording(result):
        try:
            env = session_env(
                postgres.url, tmp_path, redis_url=redis_server.url, redis_prefix=PREFIX, cache_retry_s="0.5"
            )
            async with (
                session_service(env, log_dir) as service,
                grpc.aio.insecure_channel(service.address) as channel,
            ):
                stub = session_pb2_grpc.SessionStoreStub(channel)
                load = AppendLoad(stub, read_windows=True)
                await load.create_sessions()
                # A session no writer touches, whose window shows when the cache is filled again.
                quiet = await stub.CreateSession(
                    session_pb2.CreateSessionRequest(tenant=TENANT, user_id="chaos", model="m"), timeout=10
                )
                await stub.AppendMessages(
                    session_pb2.AppendMessagesRequest(
                        tenant=TENANT,
                        session_id=quiet.session_id,
                        messages=[common_pb2.NewMessage(role=common_pb2.ROLE_USER, content="quiet")],
                    ),
                    timeout=10,
                )
                running = asyncio.create_task(load.run())

                await wait_until(lambda: load.done >= 300, timeout=60)
                assert await cached(redis_server.url) > 0, "the cache was not in use before the fault"
                redis_server.kill(signal.SIGKILL)
                killed_at = time.monotonic()

                await wait_until(lambda: load.done >= 700, timeout=60)
                await redis_server.start()
                restarted_at = time.monotonic()

                # Back in use by itself, while the load goes on: reads fill the fresh Redis again.
                async def refilled() -> bool:
                    request = session_pb2.GetWindowRequest(
                        tenant=TENANT, session_id=quiet.session_id, token_budget=200
                    )
                    await stub.GetWindow(request, timeout=5)
                    # The version marker and the window.
                    return await cached(redis_server.url, quiet.session_id) >= 2

                result.recovery_s = await wait_until(refilled, timeout=20, interval=0.05)
                await running
                verdict = await load.verify()
                tried, ok_ratio = load.success_ratio(killed_at, restarted_at)
                assert service.proc is not None and service.proc.poll() is None, service.log_tail()

            result.total, result.completed, result.failed = load.total, len(load.acked), len(load.gave_up)
            result.lost, result.duplicates = verdict.lost, verdict.duplicates
            result.note = f"{ok_ratio:.1%} of {tried} appends ok while down"
            result.passed = verdict.clean and tried > 0 and ok_ratio >= 0.99
            assert verdict.clean, verdict
            assert tried > 0 and ok_ratio >= 0.99, (tried, ok_ratio)
        finally:
            if running is not None:
                running.cancel()
            redis_server.kill(signal.SIGKILL)
            postgres.remove()
