"""Build and run the worker's gRPC server."""

from __future__ import annotations

import logging
import socket

from infermesh.worker.v1 import worker_pb2_grpc
from services.common.metrics import LoadReportCollector
from services.common.server import GrpcServer, serve_forever
from services.common.tls import TlsConfig
from services.worker import convert
from services.worker.config import WorkerConfig
from services.worker.service import WorkerService
from services.worker.servicer import SERVICE_NAME, WorkerServicer

logger = logging.getLogger(__name__)


async def create_server(config: WorkerConfig) -> GrpcServer:
    """Load the model, warm the engine up and bind; the caller starts the server.

    Loading comes first, so a started server can report SERVING straight away.
    """
    service = await WorkerService.load(config)
    try:
        return build_server(config, service)
    except BaseException:
        await service.stop()
        raise


def build_server(config: WorkerConfig, service: WorkerService) -> GrpcServer:
    """Bind a server around a loaded service (tests build several around one loaded model)."""
    servicer = WorkerServicer(service)
    server = GrpcServer(
        host=config.host,
        port=config.port,
        service_names=[SERVICE_NAME],
        register=lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
        on_drain=service.drain_and_wait,
        on_stop=service.stop,
        # Drained means every sequence has ended: a second is enough for their last messages.
        drained_grace_s=1.0,
        metrics_port=config.metrics_port,
        tls=TlsConfig.of(config),
        # The numbers StreamLoad sends the routers, read where it reads them.
        collectors=[LoadReportCollector(lambda: convert.load_to_pb(service.load_report()))],
        # The probe's verdicts, an engine crash and a Drain turn this server's health.
        serving=service.serving,
    )
    service.endpoint_id = config.endpoint_id or f"{socket.gethostname()}:{server.port}"
    return server


async def serve(config: WorkerConfig) -> None:
    server = await create_server(config)
    await server.start()
    await serve_forever(server, config.grace_s)
