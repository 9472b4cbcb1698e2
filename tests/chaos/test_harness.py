"""The chaos toolbox itself: the fault proxy adds latency, resets and refuses; throwaway servers
restart with their data; the drill table has one row per drill."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.chaos.harness import DrillResult, FaultProxy, ThrowawayPostgres, format_table


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def round_trip(port: int, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    finally:
        writer.close()
    return time.monotonic() - start


async def test_fault_proxy_forwards_delays_resets_and_refuses():
    async with echo_server() as port:
        with FaultProxy("127.0.0.1", port) as proxy:
            fast = await round_trip(proxy.port)

            proxy.set(latency_s=0.1)
            # Both directions are delayed.
            assert await round_trip(proxy.port) >= 0.2 > fast

            proxy.set(latency_s=0.0, reset_probability=1.0)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await round_trip(proxy.port)

            proxy.heal()
            proxy.set(refuse=True)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await round_trip(proxy.port)
            assert proxy.resets >= 2

            proxy.heal()
            await round_trip(proxy.port)


async def test_reset_all_breaks_open_connections():
    async with echo_server() as port:
        with FaultProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
            proxy.reset_all()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()


async def test_throwaway_postgres_restarts_on_its_port_with_its_data():
    server = ThrowawayPostgres()
    await server.start()
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        await conn.close()

        server.stop(signal.SIGKILL)
        with pytest.raises(OSError):
            await asyncpg.connect(server.url, timeout=2)

        await server.start()
        conn = await asyncpg.connect(server.url)
        assert await conn.fetchval("SELECT x FROM kept") == 7
        await conn.close()
    finally:
        server.remove()


def test_drill_table_has_a_row_per_drill():
    table = format_table(
        [
            DrillResult(
                "redis SIGKILL", "16 writers", "SIGKILL redis", 1000, 998, 2, recovery_s=1.234, passed=True
            ),
            DrillResult("postgres restart", "16 writers", "restart", 1000, 1000, passed=False, note="lost 1"),
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:3] == ["drill", "load", "injected"]
    assert "1.23 s" in lines[2] and lines[2].rstrip().endswith("pass")
    assert "FAIL (lost 1)" in lines[3]
