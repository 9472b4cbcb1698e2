"""Helpers for the end-to-end tests: a mesh of real processes on free ports, and a router stub."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc

from infermesh.router.v1 import router_pb2_grpc
from services.launcher.mesh import Mesh, MeshSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_mesh(spec: MeshSpec) -> Iterator[Mesh]:
    """The mesh's processes, started; stopped (SIGTERM, then SIGKILL) on the way out."""
    mesh = Mesh(spec)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


@asynccontextmanager
async def router_stub(mesh: Mesh, timeout: float = 300) -> AsyncIterator[router_pb2_grpc.InferenceStub]:
    """An Inference stub on the router, once every service is ready."""
    await mesh.wait_ready(timeout=timeout)
    async with grpc.aio.insecure_channel(mesh.spec.address("router")) as channel:
        yield router_pb2_grpc.InferenceStub(channel)
