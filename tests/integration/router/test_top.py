"""`infermesh top` against a real router (with its metrics port) in front of fake workers."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from rich.console import Console

from infermesh import top
from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.router.conftest import Mesh
from tests.integration.router.helpers import free_port, start_router, wait_healthy


async def _refused_generate(stub: router_pb2_grpc.InferenceStub) -> None:
    bad = router_pb2.GenerateRequest(
        model="no-such-model", messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]
    )
    with pytest.raises(grpc.aio.AioRpcError):
        [c async for c in stub.Generate(bad, timeout=5)]


async def test_top_shows_endpoints_queues_and_recent_refusals(mesh: Mesh) -> None:
    workers = [s.address for s in mesh.worker_servers]
    metrics_port = free_port()
    router = await start_router(worker_addresses=workers, metrics_port=metrics_port)
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, set(workers))
            view = top.Top(router.address, f"127.0.0.1:{metrics_port}", None, timeout=5)
            try:
                await asyncio.to_thread(view.frame)
                await _refused_generate(stub)
                frame = await asyncio.to_thread(view.frame)
            finally:
                view.close()
    finally:
        await router.stop(0)

    assert not frame.error
    out = io.StringIO()
    Console(file=out, width=220, color_system=None).print(top.render(frame))
    text = out.getvalue()
    for address in workers:
        assert address in text
    assert "fake cpu" in text
    assert "10% 10/100" in text  # the fakes report 90 of 100 KV blocks free
    for priority in ("critical", "interactive", "standard", "batch"):
        assert priority in text
    refused = [line for line in text.splitlines() if "refused" in line and "invalid_argument" in line]
    assert len(refused) == 1 and "+1" in refused[0], text


async def test_top_once_without_a_router_says_so_and_fails() -> None:
    out = io.StringIO()
    code = await asyncio.to_thread(
        top.run,
        f"127.0.0.1:{free_port()}",
        metrics_address=None,
        api_key=None,
        interval=1,
        once=True,
        timeout=1,
        console=Console(file=out, width=200, color_system=None),
    )
    assert code == 1
    assert "router: UNAVAILABLE" in out.getvalue() or "router: DEADLINE_EXCEEDED" in out.getvalue()
