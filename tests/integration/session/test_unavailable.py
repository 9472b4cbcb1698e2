"""An unreachable or silent database gives UNAVAILABLE within bounded time, never a hang or INTERNAL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.common.errors import Unavailable
from services.session import migrate
from services.session.model import NewMessage, NewSession, Role
from services.session.server import create_server
from services.session.sql_store import SqlStore
from tests.chaos.harness import FaultProxy
from tests.fixtures.databases import ThrowawayPostgres
from tests.fixtures.timing import slept_s

from .conftest import session_config
from .helpers import TENANT, all_history, append, create, history, msg, status_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and never answers, like a hung database."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


class TcpProxy:
    """Forwards a local port to the database; stopping it is a database outage."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def elapsed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.monotonic()
    with pytest.raises(Unavailable):
        await call()
    return time.monotonic() - start


async def test_store_on_a_closed_port_is_unavailable_at_once():
    # A refused connection is known at once: a store that waited out its bound would take all
    # of it, so "at once" is a small share of a generous bound, whatever the machine's load.
    timeout_s = 20.0
    store = SqlStore.from_url(closed_port_url(), timeout_s=timeout_s)
    try:
        took = [
            await elapsed(store.ping),
            await elapsed(lambda: store.get_session(TENANT, "s")),
            await elapsed(lambda: store.append(TENANT, "s", [NewMessage(Role.USER, "x", "", 1)])),
            await elapsed(lambda: store.create_session(NewSession(TENANT, "u", "m", {}, 0, "s"))),
        ]
    finally:
        await store.close()
    assert max(took) < timeout_s / 10, took


async def test_store_on_a_silent_server_gives_up_after_the_timeout():
    timeout_s = 0.5
    async with silent_server() as port:
        store = SqlStore.from_url(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/hung", timeout_s=timeout_s)
        try:
            took = await elapsed(lambda: store.get_session(TENANT, "s"))
        finally:
            await store.close()
    # It waited its bound, and gave up within twice what waiting that long takes here and now.
    reference = await slept_s(timeout_s, times=2)
    assert 0.9 * timeout_s <= took <= 2 * reference, (took, reference)


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_server_without_its_database_answers_unavailable_and_is_not_serving():
    srv = await create_server(session_config(closed_port_url(), db_timeout_s=1.0))
    await srv.start()
    try:
        assert await health_status(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            calls = [
                create(stub),
                stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id="s-1"), timeout=3),
                append(stub, "s-1", msg("hello"), timeout=3),
                history(stub, "s-1", timeout=3),
                stub.ExportUserData(
                    session_pb2.ExportUserDataRequest(tenant=TENANT, user_id="u"), timeout=3
                ).read(),
            ]
            for call in calls:
                # UNAVAILABLE, not DEADLINE_EXCEEDED: answered within the caller's 3 s.
                assert (await status_of(call)).code() == grpc.StatusCode.UNAVAILABLE
            # Bad input is still judged as bad input.
            err = await status_of(history(stub, "s-1", page_size=10_000))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await srv.stop(0)


async def wait_for_health(address: str, wanted: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await health_status(address) != wanted:
        assert time.monotonic() < deadline, f"health did not become {wanted} within {timeout}s"
        await asyncio.sleep(0.1)


@pytest.mark.postgres
async def test_health_and_calls_follow_a_postgres_outage(migrated_postgres_url):
    target = make_url(migrated_postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    srv = await create_server(session_config(url, db_timeout_s=1.0, health_interval_s=0.2))
    await srv.start()  # the database is not reachable yet
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            assert await health_status(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await status_of(create(stub))).code() == grpc.StatusCode.UNAVAILABLE

            await proxy.start()
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.SERVING)
            s = await create(stub)
            await append(stub, s.session_id, msg("before the outage"))

            await proxy.stop()
            err = await status_of(append(stub, s.session_id, msg("during"), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.NOT_SERVING)

            await proxy.start()
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.SERVING)
            reply = await append(stub, s.session_id, msg("after"))
            assert reply.last_seq == 2
    finally:
        await srv.stop(0)
        with contextlib.suppress(AssertionError):
            await proxy.stop()


@pytest.mark.postgres
async def test_a_hung_database_answers_unavailable_before_the_request_deadline_then_recovers(
    migrated_postgres_url,
):
    target = make_url(migrated_postgres_url)
    with FaultProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        # The database bound is far longer than the caller's deadline: the deadline decides.
        srv = await create_server(session_config(url, db_timeout_s=30.0, health_interval_s=60.0))
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                stub = session_pb2_grpc.SessionStoreStub(channel)
                s = await create(stub)
                await append(stub, s.session_id, msg("before"))

                proxy.set(latency_s=60.0)
                for call in (
                    append(stub, s.session_id, msg("during"), timeout=1.0),
                    history(stub, s.session_id, timeout=1.0),
                    create(stub, timeout=1.0),
                ):
                    err = await status_of(call)
                    # UNAVAILABLE, not DEADLINE_EXCEEDED: the service answered before the deadline.
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err

                proxy.heal()
                proxy.reset_all()
                deadline = time.monotonic() + 10
                while True:
                    try:
                        reply = await append(
                            stub, s.session_id, msg("after", client_msg_id="after"), timeout=2.0
                        )
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        assert time.monotonic() < deadline, "did not recover"
                # The append given up on may or may not have committed; nothing else did.
                assert reply.last_seq in (2, 3)
                assert [m.content for m in await all_history(stub, s.session_id)][-1] == "after"
        finally:
            await srv.stop(0)


@pytest.mark.postgres
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["shutdown", "kill"])
async def test_a_restarted_postgres_keeps_what_was_acknowledged_and_the_service_recovers(sig):
    """A throwaway Postgres of its own (never the shared one), stopped and started mid-test."""
    postgres = ThrowawayPostgres()
    await postgres.start()
    url = make_url(postgres.url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    srv = await create_server(session_config(url, db_timeout_s=2.0, health_interval_s=0.2, auto_migrate=True))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            s = await create(stub)
            for n in range(3):
                await append(stub, s.session_id, msg(f"before {n}"))

            postgres.stop(sig)
            # After SIGKILL a backend may live on for a moment and still commit (its WAL is kept).
            with contextlib.suppress(grpc.aio.AioRpcError):
                await append(stub, s.session_id, msg("during", client_msg_id="during"), timeout=5)
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.NOT_SERVING)
            err = await status_of(append(stub, s.session_id, msg("down"), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE

            await postgres.start()
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.SERVING)

            async def retried(content: str) -> session_pb2.AppendMessagesResponse:
                # The first call may still meet a connection from before the restart.
                for attempt in range(3):
                    try:
                        return await append(stub, s.session_id, msg(content, client_msg_id=content))
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < 2
                raise AssertionError("unreachable")

            assert (await retried("during")).messages[0].seq == 4
            assert (await retried("after")).last_seq == 5
            contents = [m.content for m in await all_history(stub, s.session_id)]
            assert contents == ["before 0", "before 1", "before 2", "during", "after"]
    finally:
        await srv.stop(0)
        postgres.remove()


async def test_sqlite_is_migrated_at_start(tmp_path):
    srv = await create_server(session_config(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"))
    await srv.start()
    try:
        assert await health_status(srv.address) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(srv.address) as channel:
            await create(session_pb2_grpc.SessionStoreStub(channel))
    finally:
        await srv.stop(0)


@pytest.mark.postgres
async def test_postgres_is_migrated_at_start_only_when_asked_and_else_waits_for_its_schema(
    empty_postgres_url,
):
    """Without auto_migrate the service stays NOT_SERVING (calls UNAVAILABLE) until someone
    migrates the schema, then serves by itself."""
    url = empty_postgres_url
    srv = await create_server(session_config(url, health_interval_s=0.1))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            assert await health_status(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await status_of(create(stub))).code() == grpc.StatusCode.UNAVAILABLE
            assert await migrate.current(url) is None

            await migrate.upgrade(url)
            await wait_for_health(srv.address, health_pb2.HealthCheckResponse.SERVING)
            await create(stub)
    finally:
        await srv.stop(0)
