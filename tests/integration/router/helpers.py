"""Router start-up, polling and request builders shared by the router's integration tests."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.config import load_config
from services.common.server import GrpcServer
from services.router.config import RouterConfig
from services.router.server import create_server


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def chat_request(text: str = "hello there", **fields: Any) -> router_pb2.GenerateRequest:
    fields.setdefault("request_id", uuid.uuid4().hex)
    return router_pb2.GenerateRequest(messages=[user(text)], **fields)


async def collect(stub: Any, request: router_pb2.GenerateRequest, **kwargs: Any) -> list[Any]:
    return [resp async for resp in stub.Generate(request, **kwargs)]


def text_of(responses: list[Any]) -> str:
    return "".join(r.text for r in responses)


# Fast reports and a short staleness window keep failure detection quick in tests.
FAST = {"load_report_interval_ms": 20, "endpoint_stale_s": 0.5, "reconnect_backoff_max_s": 0.2}


async def start_router(**overrides: Any) -> GrpcServer:
    config = load_config(RouterConfig, "router", env={}, overrides={"port": 0, **FAST, **overrides})
    server = await create_server(config)
    await server.start()
    return server


@asynccontextmanager
async def router_for(addresses: list[str], **overrides: Any) -> AsyncIterator[router_pb2_grpc.InferenceStub]:
    """A router in front of the workers at `addresses`, stopped on exit."""
    router = await start_router(worker_addresses=addresses, **overrides)
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            yield router_pb2_grpc.InferenceStub(channel)
    finally:
        await router.stop(0)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


async def healthy_endpoints(stub: router_pb2_grpc.InferenceStub) -> set[str]:
    status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=2)
    return {e.address for e in status.endpoints if e.healthy}


async def wait_healthy(stub: router_pb2_grpc.InferenceStub, addresses: set[str]) -> None:
    async def ready() -> bool:
        return addresses <= await healthy_endpoints(stub)

    await wait_until(ready, what=f"endpoints {sorted(addresses)} healthy")


async def wait_idle(stub: router_pb2_grpc.InferenceStub, addresses: set[str]) -> None:
    """Until the router's latest reports show nothing running or waiting on these endpoints."""

    async def idle() -> bool:
        status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=2)
        busy = {e.address for e in status.endpoints if e.load.running or e.load.waiting}
        healthy = {e.address for e in status.endpoints if e.healthy}
        return addresses <= healthy and not (addresses & busy)

    await wait_until(idle, what=f"endpoints {sorted(addresses)} idle")


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
