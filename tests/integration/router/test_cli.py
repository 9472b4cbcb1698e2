"""The `infermesh` CLI against a router with fake endpoints (run in-process, in a thread,
because the CLI uses blocking gRPC while the servers share this event loop)."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import grpc
import pytest

from infermesh import cli
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import EMBED_DIM, EMBED_MODEL, FakeEmbedder
from tests.integration.router.helpers import free_port, start_router, wait_healthy


async def run(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def sent_with_last_message(mesh: Mesh, content: str) -> list[Any]:
    """Requests the fake workers got whose conversation ends with `content`."""
    return [r for w in mesh.workers for r in w.requests if r.messages and r.messages[-1].content == content]


async def test_chat_streams_the_reply(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run("--address", mesh.address, "chat", "hello cli", "--max-tokens", "2", "--seed", "3")
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "echo: hello \n"
    assert err == ""
    (sent,) = sent_with_last_message(mesh, "hello cli")
    assert (sent.max_tokens, sent.sampling.seed) == (2, 3)


async def test_chat_with_new_session_then_continue_it(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run("--address", mesh.address, "chat", "--new-session", "--system", "be kind", "first")
    out, err = capsys.readouterr()
    assert code == 0 and out == "echo: first\n"
    assert err.startswith("session: ")
    session_id = err.split()[1]

    assert await run("--address", mesh.address, "chat", "--session", session_id, "second") == 0
    assert capsys.readouterr().out == "echo: second\n"
    history = await mesh.stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session_id), timeout=5)
    assert [m.content for m in history.messages] == [
        "be kind",
        "first",
        "echo: first",
        "second",
        "echo: second",
    ]


async def test_interactive_chat_keeps_a_session(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n\ntwo\n/exit\nnever\n"))
    assert await run("--address", mesh.address, "chat") == 0
    out, err = capsys.readouterr()
    assert "echo: one\n" in out and "echo: two\n" in out and "never" not in out
    session_id = err.split("session: ")[1].split()[0]
    history = await mesh.stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session_id), timeout=5)
    assert [m.content for m in history.messages] == ["one", "echo: one", "two", "echo: two"]


async def test_interactive_chat_without_session_service_keeps_history_locally(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    router = await start_router(worker_addresses=[s.address for s in mesh.worker_servers])
    try:
        monkeypatch.setattr("sys.stdin", io.StringIO("uno\ndos\n"))
        async with grpc.aio.insecure_channel(router.address) as channel:
            await wait_healthy(
                router_pb2_grpc.InferenceStub(channel), {s.address for s in mesh.worker_servers}
            )
        assert await run("--address", router.address, "chat") == 0
        out, err = capsys.readouterr()
        assert "echo: dos\n" in out and "keeping the conversation locally" in err
        assert [[m.content for m in r.messages] for r in sent_with_last_message(mesh, "dos")] == [
            ["uno", "echo: uno", "dos"]
        ]
    finally:
        await router.stop(0)


async def test_embed_prints_dimension_and_values(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("--address", mesh.address, "embed", "alpha", "beta") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"model: {EMBED_MODEL}"
    first = FakeEmbedder.vector("alpha")
    assert lines[1].startswith(f"[0] dim={EMBED_DIM} tokens=1: {first[0]:+.4f} {first[1]:+.4f}")
    assert lines[2].startswith(f"[1] dim={EMBED_DIM}")

    assert await run("--address", mesh.address, "embed", "--json", "alpha") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == EMBED_MODEL
    assert data["embeddings"][0]["values"] == pytest.approx(first)


async def test_status_prints_health_and_a_table(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("--address", mesh.address, "status") == 0
    out = capsys.readouterr().out
    assert f"router {mesh.address}" in out and "SERVING" in out
    for server in [*mesh.worker_servers, mesh.embedder_server, mesh.session_server]:
        assert server.address in out
    assert "worker" in out and "embedder" in out and "session" in out


async def test_address_comes_from_the_environment(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_ADDRESS", mesh.address)
    assert await run("status") == 0
    assert mesh.address in capsys.readouterr().out


async def test_unreachable_router_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    for argv in (["chat", "hi"], ["embed", "x"], ["status"]):
        code = await run("--address", address, *argv)
        err = capsys.readouterr().err
        assert code != 0
        assert err == f"cannot reach infermesh router at {address} — start the mesh with `make up`\n"


async def test_grpc_errors_show_code_and_details(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run("--address", mesh.address, "chat", "hi", "--temperature", "-1")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: sampling.temperature: must be >= 0")
    assert err.count("\n") == 1
