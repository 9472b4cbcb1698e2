"""Build and run the embedder server: load the model, warm it up, register the servicer."""

from __future__ import annotations

import asyncio
import logging
import socket

from infermesh.embedder.v1 import embedder_pb2_grpc
from services.common.metrics import LoadReportCollector
from services.common.server import GrpcServer, serve_forever
from services.common.tls import TlsConfig
from services.embedder import convert
from services.embedder.cache import create_cache
from services.embedder.config import EmbedderConfig
from services.embedder.engine import EmbedEngine
from services.embedder.health import HealthProbe
from services.embedder.model import EmbeddingModel
from services.embedder.servicer import SERVICE_NAME, EmbedderServicer

logger = logging.getLogger(__name__)


async def create_server(config: EmbedderConfig) -> GrpcServer:
    """Load and warm the model, then bind (port 0 picks a free port). Not started."""
    model = await asyncio.to_thread(
        EmbeddingModel.load,
        config.model_path,
        config.device,
        encode_batch_size=config.encode_batch_size,
        threads=config.torch_threads,
        compute_dtype=config.dtype,
    )
    cache = create_cache(
        max_entries=config.cache_entries,
        redis_url=config.cache_redis_url,
        prefix=f"infermesh:embed:{config.model_id}:{model.source}:",
        ttl_s=config.cache_ttl_s,
    )
    engine = EmbedEngine(
        model,
        model_id=config.model_id,
        max_items_per_request=config.max_items_per_request,
        max_batch_tokens=config.max_batch_tokens,
        max_wait_s=config.max_wait_ms / 1000,
        max_input_chars=config.max_input_chars,
        cache=cache,
    )
    probe: HealthProbe | None = None

    async def stop() -> None:
        if probe is not None:
            await probe.stop()
        await engine.close()

    try:
        await engine.start()
        servicer = EmbedderServicer(
            engine, endpoint_id=config.endpoint_id, default_interval_ms=config.load_interval_ms
        )
        server = GrpcServer(
            host=config.host,
            port=config.port,
            service_names=[SERVICE_NAME],
            register=lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s),
            on_drain=engine.drain,
            on_stop=stop,
            metrics_port=config.metrics_port,
            tls=TlsConfig.of(config),
            # The numbers StreamLoad sends the routers, read where it reads them.
            collectors=[
                LoadReportCollector(lambda: convert.load_report_to_pb(servicer.endpoint_id, engine.load()))
            ],
        )
        probe = HealthProbe(
            engine.probe,
            lambda: engine.batches,
            server.set_serving,
            interval_s=config.health_interval_s,
            timeout_s=config.health_timeout_s,
            paused=lambda: engine.draining,
        )
        probe.start()
    except BaseException:
        await stop()
        raise
    if not servicer.endpoint_id:
        servicer.endpoint_id = f"{socket.gethostname()}:{server.port}"
    return server


async def serve(config: EmbedderConfig) -> None:
    server = await create_server(config)
    # Start only now: health says SERVING once the model is loaded and warmed up.
    await server.start()
    await serve_forever(server, config.grace_s)
