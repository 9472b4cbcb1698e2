"""`python -m services.common.healthcheck`, the containers' health check, against a real server."""

from __future__ import annotations

import asyncio

import pytest

from services.common import healthcheck
from services.common.server import GrpcServer
from tests.integration.router.helpers import free_port


async def run(*argv: str) -> int:
    return await asyncio.to_thread(healthcheck.main, list(argv))


async def test_serving_then_draining_then_gone(capsys: pytest.CaptureFixture[str]) -> None:
    server = GrpcServer(host="127.0.0.1", port=0, service_names=["x.v1.Svc"], register=lambda s: None)
    await server.start()
    try:
        assert await run(server.address) == 0
        assert capsys.readouterr().out == f"{server.address}: SERVING\n"
        assert await run(server.address, "--service", "x.v1.Svc") == 0
        await server.set_serving(False)
        assert await run(server.address) == 1
        assert capsys.readouterr().err == f"{server.address}: NOT_SERVING\n"
    finally:
        await server.stop(0)
    address = f"127.0.0.1:{free_port()}"
    assert await run(address, "--timeout", "1") == 1
    assert capsys.readouterr().err.startswith(f"{address}: UNAVAILABLE")
