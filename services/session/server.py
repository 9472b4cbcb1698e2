"""Session server: the store behind gRPC, SERVING only while the database answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from infermesh.session.v1 import governance_pb2, governance_pb2_grpc, session_pb2, session_pb2_grpc
from services.common.server import GrpcServer, serve_forever
from services.common.tasks import cancel_and_wait
from services.common.tls import TlsConfig
from services.session import db, migrate, retention
from services.session.cache import CachedStore, MemoryWindowCache, WindowCache
from services.session.config import SessionConfig
from services.session.crypto import KeyRing, load_key_ring
from services.session.governance import GovernanceServicer
from services.session.keys_store import KeysStore
from services.session.redis_cache import RedisWindowCache
from services.session.servicer import SessionStoreServicer
from services.session.sql_store import SqlStore
from services.session.store import Store
from services.session.validation import Limits

logger = logging.getLogger(__name__)

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionStore"].full_name
GOVERNANCE_NAME = governance_pb2.DESCRIPTOR.services_by_name["Governance"].full_name
RETRY_MIN_S = 0.2


class DatabaseProbe:
    """Migrates once (when asked), then pings the database; its verdict drives health."""

    def __init__(
        self,
        store: Store,
        database_url: str,
        *,
        auto_migrate: bool,
        interval_s: float,
        timeout_s: float,
        check_schema: bool = False,
    ) -> None:
        self._store = store
        self._url = database_url
        self._migrate = auto_migrate
        # Without auto_migrate: wait for the schema to be at this code's head before SERVING.
        self._check_schema = check_schema
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        # True once the schema is known to be in place: requests may go through.
        self.ready = False
        self.serving = False

    async def check(self) -> bool:
        try:
            if self._migrate and not self.ready:
                await migrate.upgrade(self._url, timeout_s=self._timeout_s)
                logger.info("database schema up to date")
            elif self._check_schema and not self.ready:
                at = await migrate.current(self._url, timeout_s=self._timeout_s)
                if at != migrate.head():
                    # Not SERVING on a schema this code does not know: requests would fail.
                    raise RuntimeError(
                        f"database schema at {at or 'nothing'}, this service needs {migrate.head()}: "
                        "run `python -m services.session migrate` (or set auto_migrate)"
                    )
            async with asyncio.timeout(2 * self._timeout_s):
                await self._store.ping()
        except Exception as exc:
            if self.serving or not self.ready:
                logger.warning("database not ready: %s", db.describe(exc))
            return False
        self.ready = True
        return True

    async def update(self, set_serving: Callable[[bool], Awaitable[None]]) -> bool:
        ok = await self.check()
        if ok != self.serving:
            self.serving = ok
            await set_serving(ok)
            logger.info("health %s", "SERVING" if ok else "NOT_SERVING")
        return ok

    async def run(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Probe forever (after a first `update`): every interval_s while healthy,
        backing off from RETRY_MIN_S while failing."""
        delay = RETRY_MIN_S
        while True:
            if self.serving:
                delay = RETRY_MIN_S
                await asyncio.sleep(self._interval_s)
            else:
                await asyncio.sleep(delay)
                delay = min(2 * delay, self._interval_s)
            await self.update(set_serving)


class SessionServer(GrpcServer):
    def __init__(
        self, *, probe: DatabaseProbe, store: CachedStore, retention_interval_s: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.probe = probe
        self.store = store
        self._retention_interval_s = retention_interval_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, serving: bool = True) -> None:
        """Start; SERVING comes from the database probe, not from `serving`.

        The first probe runs before this returns (bounded by db_timeout_s), so a
        reachable database is SERVING at once; an unreachable one is retried.
        """
        await super().start(serving=False)
        # The health servicer starts out SERVING for "" until told otherwise.
        await self.set_serving(False)
        await self.probe.update(self.set_serving)
        self._tasks.append(asyncio.create_task(self.probe.run(self.set_serving)))
        if self._retention_interval_s > 0:
            purge = retention.purge_forever(self.store, self._retention_interval_s, lambda: self.probe.ready)
            self._tasks.append(asyncio.create_task(purge))

    async def stop(self, grace: float = 10.0) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
        await super().stop(grace)


def window_cache(config: SessionConfig, keys: KeyRing) -> WindowCache:
    """Redis when configured, else in process. Health never depends on it."""
    if config.redis_url:
        return RedisWindowCache(
            config.redis_url,
            prefix=config.redis_prefix,
            ttl_s=config.cache_ttl_s,
            timeout_s=config.redis_timeout_s,
            keys=keys,
        )
    return MemoryWindowCache(config.cache_max_sessions, ttl_s=config.cache_ttl_s)


async def create_server(config: SessionConfig) -> SessionServer:
    url = db.resolve_url(config.database_url, config.state_dir)
    keys = load_key_ring(config.encryption_keys, config.state_dir)
    sql_store = SqlStore.from_url(url, pool_size=config.pool_size, timeout_s=config.db_timeout_s, keys=keys)
    store = CachedStore(sql_store, window_cache(config, keys), retry_s=config.cache_retry_s)
    probe = DatabaseProbe(
        store,
        url,
        auto_migrate=config.auto_migrate or url.startswith("sqlite"),
        check_schema=True,
        interval_s=config.health_interval_s,
        timeout_s=config.db_timeout_s,
    )
    limits = Limits(
        max_message_chars=config.max_message_chars,
        max_messages_per_append=config.max_messages_per_append,
        default_page_size=config.default_page_size,
        max_page_size=config.max_page_size,
    )
    # A store call waits for a pooled connection, connects and runs its statements, each bounded
    # by db_timeout_s; a deadline nearer than a few of those is guarded in the servicer.
    servicer = SessionStoreServicer(
        store, limits, ready=lambda: probe.ready, guard_below_s=3 * config.db_timeout_s
    )
    governance = GovernanceServicer(KeysStore(sql_store.engine), ready=lambda: probe.ready)

    def register(server: Any) -> None:
        session_pb2_grpc.add_SessionStoreServicer_to_server(servicer, server)
        governance_pb2_grpc.add_GovernanceServicer_to_server(governance, server)

    return SessionServer(
        host=config.host,
        port=config.port,
        service_names=[SERVICE_NAME, GOVERNANCE_NAME],
        register=register,
        on_stop=store.close,
        probe=probe,
        store=store,
        retention_interval_s=config.retention_interval_s,
        metrics_port=config.metrics_port,
        tls=TlsConfig.of(config),
    )


async def serve(config: SessionConfig) -> None:
    server = await create_server(config)
    await server.start()
    await serve_forever(server, config.grace_s)
