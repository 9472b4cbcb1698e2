"""The window cache on real Redis behind the gRPC server: fresh after writes, Redis loss costs nothing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.session.server import SessionServer, create_server
from tests.fixtures.databases import ThrowawayRedis

from .conftest import session_config
from .helpers import TENANT, TIMEOUT_S, all_history, append, create, msg

pytestmark = pytest.mark.postgres

BUDGET = 1000


@contextlib.asynccontextmanager
async def serving(
    database_url: str, redis_url: str, **overrides: Any
) -> AsyncIterator[tuple[SessionServer, Any]]:
    """A started server using Redis under a prefix of its own, and a stub to it."""
    prefix = f"test:{uuid.uuid4().hex}"
    config = session_config(
        database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        cache_retry_s=0.1,
        # Generous: a slow answer on a busy machine must not count as a Redis failure here.
        redis_timeout_s=2.0,
        **overrides,
    )
    server = await create_server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, session_pb2_grpc.SessionStoreStub(channel)
    finally:
        await server.stop(0)


async def window(stub: Any, session_id: str, budget: int = BUDGET) -> list[str]:
    reply = await stub.GetWindow(
        session_pb2.GetWindowRequest(tenant=TENANT, session_id=session_id, token_budget=budget),
        timeout=TIMEOUT_S,
    )
    return [m.content for m in reply.messages]


async def health(server: SessionServer) -> int:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return reply.status


async def redis_keys(url: str, server: SessionServer) -> dict[bytes, dict[bytes, bytes]]:
    client = aioredis.Redis.from_url(url)
    try:
        prefix = server.store.cache.prefix  # type: ignore[attr-defined]
        return {key: await client.hgetall(key) async for key in client.scan_iter(match=f"{prefix}:*")}
    finally:
        await client.aclose()


async def test_windows_are_served_from_redis_and_fresh_after_every_append(pg_url, redis_url):
    async with serving(pg_url, redis_url) as (server, stub):
        s = await create(stub)
        await append(stub, s.session_id, msg("be brief", common_pb2.ROLE_SYSTEM), msg("one"))
        assert await window(stub, s.session_id) == ["be brief", "one"]
        assert await window(stub, s.session_id) == ["be brief", "one"]
        stats = server.store.stats
        assert (stats.misses, stats.hits, stats.errors) == (1, 1, 0)
        [(key, fields)] = (await redis_keys(redis_url, server)).items()
        assert s.session_id in key.decode() and fields[b"v"] == b"2" and f"b:{BUDGET}".encode() in fields

        for n in range(5):
            await append(stub, s.session_id, msg(f"turn {n}"))
            # Read right after the acknowledged write: never the cached older window.
            assert (await window(stub, s.session_id))[-1] == f"turn {n}"
            assert (await window(stub, s.session_id))[-1] == f"turn {n}"
        assert (stats.hits, stats.misses, stats.errors) == (6, 6, 0)


async def test_concurrent_writers_and_readers_never_see_a_stale_window(pg_url, redis_url):
    async with serving(pg_url, redis_url) as (server, stub):
        s = await create(stub)
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                await window(stub, s.session_id)

        async def writer(w: int) -> None:
            for n in range(6):
                await append(stub, s.session_id, msg(f"w{w}-{n}"))
                assert f"w{w}-{n}" in await window(stub, s.session_id)

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        try:
            await asyncio.gather(*(writer(w) for w in range(6)))
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert len(await window(stub, s.session_id)) == 36
        assert server.store.stats.errors == 0


async def test_redis_flushed_mid_test_costs_a_miss_not_an_error(pg_url, redis_url):
    async with serving(pg_url, redis_url) as (server, stub):
        s = await create(stub)
        await append(stub, s.session_id, msg("kept in postgres"))
        await window(stub, s.session_id)
        client = aioredis.Redis.from_url(redis_url)
        try:
            for key in await redis_keys(redis_url, server):
                await client.delete(key)
        finally:
            await client.aclose()
        assert await window(stub, s.session_id) == ["kept in postgres"]
        assert server.store.stats.misses == 2 and server.store.stats.errors == 0


async def test_erase_and_delete_leave_no_cached_window(pg_url, redis_url):
    async with serving(pg_url, redis_url) as (server, stub):
        doomed = [await create(stub, user="leaving") for _ in range(2)]
        for s in doomed:
            await append(stub, s.session_id, msg("private"))
            await window(stub, s.session_id)
        await stub.EraseUserData(
            session_pb2.EraseUserDataRequest(tenant=TENANT, user_id="leaving"), timeout=TIMEOUT_S
        )
        other = await create(stub)
        await append(stub, other.session_id, msg("short-lived"))
        await window(stub, other.session_id)
        await stub.DeleteSession(
            session_pb2.DeleteSessionRequest(tenant=TENANT, session_id=other.session_id), timeout=TIMEOUT_S
        )
        # Only version markers remain, which hold no content.
        keys = await redis_keys(redis_url, server)
        assert len(keys) == 3 and all(set(fields) == {b"v"} for fields in keys.values())
        for s in [*doomed, other]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await window(stub, s.session_id)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_redis_killed_mid_test_serves_from_postgres_then_uses_redis_again(
    pg_url, throwaway_redis: ThrowawayRedis
):
    async with serving(pg_url, throwaway_redis.url) as (server, stub):
        s = await create(stub)
        await append(stub, s.session_id, msg("before"))
        assert await window(stub, s.session_id) == ["before"]
        throwaway_redis.kill()

        for n in range(3):
            await append(stub, s.session_id, msg(f"during {n}"))
            assert (await window(stub, s.session_id))[-1] == f"during {n}"
        stats = server.store.stats
        assert stats.errors >= 1
        assert await health(server) == health_pb2.HealthCheckResponse.SERVING

        await throwaway_redis.start()
        await asyncio.sleep(0.2)  # past cache_retry_s
        hits = stats.hits
        await append(stub, s.session_id, msg("after"))
        for _ in range(2):
            assert (await window(stub, s.session_id))[-1] == "after"
        assert stats.hits == hits + 1
        assert await redis_keys(throwaway_redis.url, server)


async def test_32_writers_on_one_session_with_redis_leave_one_gap_free_order_for_every_reader(
    pg_url, redis_url
):
    """Writers retry every append (same client ids) while readers page the history and read
    windows: no seq twice, none missing, and every read agrees with the final order."""
    writers, turns, budget = 32, 4, 100_000
    async with serving(pg_url, redis_url) as (server, stub):
        s = await create(stub)
        stop = asyncio.Event()
        seen: list[list[tuple[int, str]]] = []

        async def reader() -> None:
            while not stop.is_set():
                reply = await stub.GetWindow(
                    session_pb2.GetWindowRequest(tenant=TENANT, session_id=s.session_id, token_budget=budget),
                    timeout=TIMEOUT_S,
                )
                seen.append([(m.seq, m.content) for m in reply.messages])
                seen.append([(m.seq, m.content) for m in await all_history(stub, s.session_id)])

        async def writer(w: int) -> list[tuple[int, str]]:
            acked = []
            for n in range(turns):
                # Even turns append the user message and the reply together.
                batch = [msg(f"w{w}-{n}-{k}", client_msg_id=f"w{w}-{n}-{k}") for k in range(1 + n % 2)]
                reply = await append(stub, s.session_id, *batch)
                retried = await append(stub, s.session_id, *batch)
                assert [m.seq for m in retried.messages] == [m.seq for m in reply.messages]
                acked.extend((m.seq, m.content) for m in reply.messages)
            return acked

        readers = [asyncio.create_task(reader()) for _ in range(3)]
        try:
            acked = [
                pair for pairs in await asyncio.gather(*(writer(w) for w in range(writers))) for pair in pairs
            ]
        finally:
            stop.set()
            await asyncio.gather(*readers)

        final = [(m.seq, m.content) for m in await all_history(stub, s.session_id)]
        assert [seq for seq, _ in final] == list(range(1, writers * turns * 3 // 2 + 1))
        assert sorted(acked) == final
        # Every read is a gap-free run of the one final order.
        assert seen
        for read in seen:
            if read:
                first = read[0][0]
                assert read == final[first - 1 : first - 1 + len(read)]
        assert await window(stub, s.session_id, budget) == [content for _, content in final]
        assert server.store.stats.errors == 0
