"""The whole mesh as four separate processes, talked to only through the router."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.launcher.mesh import SERVICES, Mesh, MeshSpec
from tests.e2e.meshes import free_port, router_stub, running_mesh
from tests.fixtures.prompts import CAPITAL_QUESTION

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    spec = MeshSpec(
        state_dir=tmp_path_factory.mktemp("mesh"),
        router_port=free_port(),
        session_port=free_port(),
        worker_port=free_port(),
        embedder_port=free_port(),
    )
    with running_mesh(spec) as m:
        yield m


@pytest.fixture(scope="module")
async def stub(mesh: Mesh) -> AsyncIterator[router_pb2_grpc.InferenceStub]:
    async with router_stub(mesh) as stub:
        yield stub


def _user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


async def test_chat_with_session_names_paris_and_records_both_turns(
    stub: router_pb2_grpc.InferenceStub,
) -> None:
    session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="e2e-user"), timeout=10)
    request = router_pb2.GenerateRequest(
        messages=[_user(CAPITAL_QUESTION)],
        session_id=session.session_id,
        max_tokens=48,
    )
    chunks = [chunk async for chunk in stub.Generate(request, timeout=120)]
    reply = "".join(c.text for c in chunks)

    assert "Paris" in reply
    assert len([c for c in chunks if c.text]) > 1, "the reply should stream in several messages"
    assert chunks[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert chunks[-1].usage.completion_tokens > 0

    history = await stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session.session_id), timeout=10)
    assert [(m.role, m.seq) for m in history.messages] == [
        (common_pb2.ROLE_USER, 1),
        (common_pb2.ROLE_ASSISTANT, 2),
    ]
    assert history.messages[0].content == CAPITAL_QUESTION
    assert history.messages[1].content == reply


async def test_second_turn_sees_the_first(stub: router_pb2_grpc.InferenceStub) -> None:
    session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="e2e-user"), timeout=10)
    first = router_pb2.GenerateRequest(
        messages=[_user("My name is Alice. Please remember it.")],
        session_id=session.session_id,
        max_tokens=24,
    )
    [c async for c in stub.Generate(first, timeout=120)]
    second = router_pb2.GenerateRequest(
        messages=[_user("What is my name?")], session_id=session.session_id, max_tokens=24
    )
    reply = "".join([c.text async for c in stub.Generate(second, timeout=120)])
    assert "Alice" in reply
    history = await stub.GetHistory(router_pb2.GetHistoryRequest(session_id=session.session_id), timeout=10)
    assert [m.seq for m in history.messages] == [1, 2, 3, 4]


async def test_embed_through_the_router(stub: router_pb2_grpc.InferenceStub) -> None:
    resp = await stub.Embed(router_pb2.EmbedRequest(inputs=["hello world", "bonjour"]), timeout=30)
    assert len(resp.embeddings) == 2
    for e in resp.embeddings:
        assert len(e.values) == 384
        assert abs(sum(v * v for v in e.values) - 1.0) < 1e-3


BAD_REQUESTS = [
    ("model", router_pb2.GenerateRequest(model="no-such-model", messages=[_user("hi")])),
    ("messages", router_pb2.GenerateRequest(messages=[])),
    ("max_tokens", router_pb2.GenerateRequest(messages=[_user("hi")], max_tokens=-5)),
    ("max_tokens", router_pb2.GenerateRequest(messages=[_user("hi")], max_tokens=10_000_000)),
    (
        "temperature",
        router_pb2.GenerateRequest(
            messages=[_user("hi")], sampling=common_pb2.SamplingParams(temperature=-1.0)
        ),
    ),
    ("prompt", router_pb2.GenerateRequest(prompt="word " * 20_000, max_tokens=4)),
]


@pytest.mark.parametrize(("field", "request_"), BAD_REQUESTS, ids=[f for f, _ in BAD_REQUESTS])
async def test_bad_input_is_invalid_argument_and_nothing_crashes(
    stub: router_pb2_grpc.InferenceStub, mesh: Mesh, field: str, request_: router_pb2.GenerateRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        [c async for c in stub.Generate(request_, timeout=60)]
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert field in exc.value.details()
    assert set(mesh.running()) == set(SERVICES)


async def test_cli_chat_and_status(mesh: Mesh, stub: router_pb2_grpc.InferenceStub) -> None:
    env = {**os.environ, "INFERMESH_ADDRESS": mesh.spec.address("router")}
    cli = [sys.executable, "-m", "infermesh.cli"]
    chat = subprocess.run(
        [*cli, "chat", "--max-tokens", "32", CAPITAL_QUESTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert status.returncode == 0, status.stderr
    assert mesh.spec.address("worker") in status.stdout


SERVICE_NAMES = {
    "router": "infermesh.router.v1.Inference",
    "session": "infermesh.session.v1.SessionStore",
    "worker": "infermesh.worker.v1.Worker",
    "embedder": "infermesh.embedder.v1.Embedder",
}


@pytest.mark.parametrize("service", SERVICES)
async def test_every_process_has_health_and_reflection(
    mesh: Mesh, stub: router_pb2_grpc.InferenceStub, service: str
) -> None:
    async with grpc.aio.insecure_channel(mesh.spec.address(service)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service]), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for answer in call:
            names |= {s.name for s in answer.list_services_response.service}
            break
    assert {SERVICE_NAMES[service], "grpc.health.v1.Health"} <= names


async def test_logs_are_json_lines_without_message_content(
    mesh: Mesh, stub: router_pb2_grpc.InferenceStub
) -> None:
    for service in SERVICES:
        lines = (mesh.log_dir / f"{service}.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records, f"{service} wrote no JSON log lines"
        assert all(r["service"] == service and "level" in r and "time" in r for r in records)
        assert not any("capital of France" in line for line in lines), f"{service} logged message content"


async def test_sigterm_drains_every_process(mesh: Mesh, stub: router_pb2_grpc.InferenceStub) -> None:
    """Last in the module (pytest keeps file order): SIGTERM stops all four without SIGKILL."""
    outcome = mesh.stop(grace=30)
    assert outcome == dict.fromkeys(SERVICES, "terminated")
    assert mesh.running() == {}
