"""Admin.DrainEndpoint: stop sending new requests to one worker, let its streams finish.

The router asks the worker to drain; the worker then refuses new work, reports `draining` in
its load reports and turns NOT_SERVING, so every router replica stops placing on it (not just
this one), while the streams already running there go on to the end.
"""

from __future__ import annotations

import logging

import grpc

from infermesh.worker.v1 import worker_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.router.core.domain import EndpointKind
from services.router.endpoints import EndpointMonitor

logger = logging.getLogger(__name__)


async def drain_endpoint(endpoints: EndpointMonitor, address: str, timeout_s: float) -> None:
    if not address:
        raise InvalidArgument(
            "address", "must not be empty: host:port of a worker, as cluster status lists it"
        )
    views = {v.address: v for v in endpoints.registry.views(endpoints.clock())}
    view = views.get(address)
    if view is None:
        known = ", ".join(sorted(a for a, v in views.items() if v.kind is EndpointKind.WORKER)) or "none"
        raise NotFound(f"address: {address!r} is not an endpoint of this router (workers: {known})")
    if view.kind is not EndpointKind.WORKER:
        raise FailedPrecondition(f"{address} is a {view.kind.value}: only workers can be drained")
    try:
        await endpoints.stub(address).Drain(worker_pb2.DrainRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise Unavailable(
            f"worker {address} did not take the drain ({exc.code().name}: {exc.details()})"
        ) from None
    logger.info("worker %s draining on request", address)
