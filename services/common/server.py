"""Server bootstrap shared by every service: grpc.aio server, health, reflection,
graceful drain on SIGTERM.

Each service has `create_server(config) -> (Service, port)` built on
`GrpcServer`; `serve_forever` runs it until a signal arrives.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from services.common import heap
from services.common.malformed import MalformedRequests
from services.common.metrics import HandlerInterceptor, MetricsEndpoint, checked_first
from services.common.serving import ServingSignal
from services.common.telemetry import server_interceptors
from services.common.tls import TlsConfig, server_credentials

logger = logging.getLogger(__name__)

# Large enough for embedding batches and long prompts; bigger messages get
# RESOURCE_EXHAUSTED from gRPC itself.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


# Open to any client certificate of the mesh CA: probes and tools that are no mesh service.
_OPEN_SERVICES = (
    f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/",
    f"/{reflection.SERVICE_NAME}/",
)


class AllowedClients(HandlerInterceptor):
    """Zero trust inside the mesh: under mutual TLS, a call whose client certificate's common
    name is not in `allowed` is PERMISSION_DENIED (any certificate of the CA would pass TLS)."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if path.startswith(_OPEN_SERVICES):
            return handler
        return checked_first(handler, self._check)

    async def _check(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
        if not self.allowed.intersection(names):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {', '.join(map(repr, names)) or '(none)'} may not call this service "
                f"(tls_allowed_clients: {', '.join(sorted(self.allowed))})",
            )


class GrpcServer:
    """A grpc.aio server with health and reflection, bound but not started.

    `service_names` are the full names of the services registered, for health
    (each one plus the overall "") and reflection.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        service_names: Iterable[str],
        register: Callable[[grpc.aio.Server], None],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_drain: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        drained_grace_s: float | None = None,
        metrics_port: int = 0,
        collectors: Iterable[Collector] = (),
        tls: TlsConfig | None = None,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        serving: ServingSignal | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        tls = tls or TlsConfig()
        # The first is outermost: telemetry sees every call; callers are checked before their
        # bytes are parsed; the service's own (e.g. the router's authentication) run last.
        chain: list[grpc.aio.ServerInterceptor] = list(server_interceptors())
        if tls.checks_callers:
            chain.append(AllowedClients(tls.allowed_clients))
        chain.append(MalformedRequests())
        chain.extend(interceptors)
        self.server = grpc.aio.server(options=options, interceptors=chain)
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        # TLS (and mutual TLS) when the service's config asks for it (services.common.tls).
        credentials = server_credentials(tls)
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._on_drain = on_drain
        self._on_stop = on_stop
        # Once `on_drain` has seen the service's own work finish, what is left open is long-lived
        # streams (health Watch, load reports) that would hold the stop for the whole grace.
        self._drained_grace_s = drained_grace_s
        self._stopped = asyncio.Event()
        # The process's series plus this server's own (its load report); port 0 = off.
        self.metrics = MetricsEndpoint(host, metrics_port, collectors)
        if serving is not None:
            serving.subscribe(self.set_serving)

    async def start(self, serving: bool = True) -> None:
        await self.server.start()
        self.metrics.start()
        # The health servicer answers SERVING for "" by default; say the truth from the start.
        await self.set_serving(serving)

    async def set_serving(self, serving: bool) -> None:
        if serving and self._stopped.is_set():
            # A late "healthy again" (e.g. a health probe) must not undo a drain.
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: NOT_SERVING first (load balancers stop sending), then finish in-flight work."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.set_serving(False)
        final_grace = grace
        if self._on_drain is not None:
            try:
                await asyncio.wait_for(self._on_drain(), timeout=grace)
                if self._drained_grace_s is not None:
                    final_grace = min(grace, self._drained_grace_s)
            except TimeoutError:
                logger.warning("drain did not finish within %.1fs", grace)
        await self.server.stop(final_grace)
        await asyncio.to_thread(self.metrics.stop)
        if self._on_stop is not None:
            await self._on_stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_forever(server: GrpcServer, grace: float) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully. The process is loaded by now: its
    startup heap is frozen out of the cycle collector's walks (`services.common.heap`)."""
    heap.record_pauses()
    heap.freeze_startup_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("serving", extra={"address": server.address})
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        logger.info("signal received, draining", extra={"grace_s": grace})
        await server.stop(grace)
    waiter.cancel()
    stopper.cancel()
    logger.info("stopped")


async def wait_serving(address: str, timeout: float, service: str = "") -> None:
    """Poll a server's gRPC health until SERVING; raise TimeoutError otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last = "no answer"
        while loop.time() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError as exc:
                last = exc.code().name
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s (last: {last})")
