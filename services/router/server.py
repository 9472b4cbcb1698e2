"""Router server factory: endpoint monitor, session client and servicers on one GrpcServer."""

from __future__ import annotations

import logging
import uuid

import grpc

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.session.v1 import governance_pb2_grpc
from services.common.server import GrpcServer, serve_forever
from services.common.telemetry import client_interceptors
from services.common.tls import TlsConfig, aio_channel
from services.router.admin import AdminServicer
from services.router.audit import AuditSink
from services.router.auth import DEFAULT_TENANT, Authenticator, KeyResolver, Principal
from services.router.call_guard import CallGuard
from services.router.config import RouterConfig
from services.router.core.catalog import load_catalog
from services.router.core.domain import EndpointKind
from services.router.core.load import LoadModel, Priors
from services.router.core.placement import create_placement_policy
from services.router.core.rbac import build_roles
from services.router.discovery import Discovery, split_addresses
from services.router.endpoints import EndpointMonitor, channel_options
from services.router.metrics import RouterCollector
from services.router.quota_store import Quotas
from services.router.servicer import InferenceServicer
from services.router.sessions import SessionClient

logger = logging.getLogger(__name__)

SERVICE_NAMES = [
    router_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    router_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
]


async def create_server(config: RouterConfig) -> GrpcServer:
    """Bind the router (not started). Endpoint discovery starts here, so the registry is
    warming up by the time the server answers; the router serves even before any worker
    is known (Generate then answers UNAVAILABLE)."""
    tls = TlsConfig.of(config)
    endpoints = create_endpoints(config, tls)
    sessions = None
    governance = None
    if config.session_address:
        channel = aio_channel(
            config.session_address,
            tls,
            options=channel_options(config.reconnect_backoff_max_s),
            interceptors=client_interceptors(),
        )
        sessions = SessionClient(config.session_address, channel, config.downstream_timeout_s)
        governance = governance_pb2_grpc.GovernanceStub(channel)
    roles = build_roles(config.roles)
    resolver = KeyResolver(
        governance, roles, cache_s=config.auth.cache_s, timeout_s=config.downstream_timeout_s
    )
    sink = AuditSink(governance, timeout_s=config.downstream_timeout_s)
    quotas = create_quotas(config)
    guard = CallGuard(config.guard.policy(), quotas, sink)
    auth = Authenticator(
        resolver,
        sink,
        enabled=config.auth.enabled,
        anonymous=Principal(DEFAULT_TENANT, roles["admin"]),
    )
    if config.auth.enabled:
        logger.info("authentication on: every public RPC needs an API key")
    else:
        logger.warning(
            "authentication OFF (router.auth_enabled=false): every caller acts as tenant %r "
            "with the admin role",
            DEFAULT_TENANT,
        )
    router_id = config.router_id or f"router-{uuid.uuid4().hex[:8]}"
    inference = InferenceServicer(config, endpoints, sessions, router_id, guard)

    def register(server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_InferenceServicer_to_server(inference, server)
        admin = AdminServicer(governance, roles, resolver, config.downstream_timeout_s, endpoints)
        router_pb2_grpc.add_AdminServicer_to_server(admin, server)

    async def on_stop() -> None:
        await inference.batches.stop()
        await discovery.stop()
        await endpoints.stop()
        await sink.stop()
        await quotas.close()
        if sessions is not None:
            await sessions.close()

    server = GrpcServer(
        host=config.host,
        port=config.port,
        service_names=SERVICE_NAMES,
        register=register,
        on_stop=on_stop,
        metrics_port=config.metrics_port,
        tls=tls,
        collectors=[RouterCollector(inference.pipeline.admission, endpoints)],
        interceptors=[auth.interceptor()],
    )
    await endpoints.start()
    discovery = Discovery(
        endpoints,
        [(name, EndpointKind.WORKER) for name in split_addresses(config.worker_addresses)[1]]
        + [(name, EndpointKind.EMBEDDER) for name in split_addresses(config.embedder_addresses)[1]],
        config.discovery_interval_s,
    )
    await discovery.start()
    await inference.batches.start()
    sink.start()
    return server


def create_endpoints(config: RouterConfig, tls: TlsConfig) -> EndpointMonitor:
    """The endpoint monitor (registry, placement, the one load model), not started."""
    load_model = LoadModel(
        Priors(
            decode_tokens_per_s=config.prior.decode_tokens_per_s,
            prefill_tokens_per_s=config.prior.prefill_tokens_per_s,
            tokens_per_sequence=config.default_max_tokens,
        ),
        streams_per_worker=config.max_streams_per_worker,
        headroom_share=config.priority_headroom,
    )
    endpoints = EndpointMonitor(
        tls=tls,
        workers=split_addresses(config.worker_addresses)[0],
        embedders=split_addresses(config.embedder_addresses)[0],
        report_interval_ms=config.load_report_interval_ms,
        stale_after_s=config.endpoint_stale_s,
        rpc_timeout_s=config.downstream_timeout_s,
        backoff_max_s=config.reconnect_backoff_max_s,
        policy=create_placement_policy(
            config.placement_policy,
            load_model,
            config.affinity_factor,
            session_affinity=config.session_affinity,
        ),
        load_model=load_model,
        waiting_window_s=config.overload_window_s,
        eject_after_errors=config.eject_after_errors,
        eject_s=config.eject_s,
    )
    if config.catalog_file:
        endpoints.registry.configure_models(load_catalog(config.catalog_file))
    return endpoints


def create_quotas(config: RouterConfig) -> Quotas:
    settings = config.quota
    quotas = Quotas(
        settings.base(),
        settings.by_tenant(),
        redis_url=settings.redis_url,
        prefix=settings.redis_prefix,
        timeout_s=settings.redis_timeout_s,
    )
    if quotas.enabled and not settings.redis_url:
        logger.warning("quotas are counted by this replica alone (quota_redis_url is empty)")
    return quotas


async def serve(config: RouterConfig) -> None:
    server = await create_server(config)
    await server.start()
    await serve_forever(server, config.grace_s)
