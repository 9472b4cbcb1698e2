"""The Python client and batch jobs against the real mesh (four processes, the real models):
a batch survives its router being killed mid-job, because the job lives in the batch store
and the restarted router takes it over."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from infermesh import cli
from infermesh.client import AsyncClient, BatchState, Client, FinishReason
from services.launcher.mesh import Mesh, MeshSpec
from tests.e2e.meshes import free_port, running_mesh
from tests.fixtures.prompts import CAPITAL_QUESTION

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTIONS = [
    ("france", CAPITAL_QUESTION),
    ("colour", "Name one colour of the rainbow."),
    ("sum", "What is two plus two?"),
    ("greet", "Say hello in French."),
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("mesh")
    spec = MeshSpec(
        state_dir=state,
        router_port=free_port(),
        session_port=free_port(),
        worker_port=free_port(),
        embedder_port=free_port(),
        extra_env={
            "INFERMESH_ROUTER_BATCH_STORE_URL": f"sqlite+aiosqlite:///{state / 'batches.db'}",
            "INFERMESH_ROUTER_BATCH_LEASE_S": "1",
        },
    )
    with running_mesh(spec) as m:
        asyncio.run(m.wait_ready(timeout=300))
        yield m


def test_sync_client_answers_streams_and_embeds(mesh: Mesh) -> None:
    with Client(mesh.spec.address("router"), timeout=180) as client:
        reply = client.generate(CAPITAL_QUESTION, max_tokens=48)
        assert "Paris" in reply.text
        assert reply.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert 0 < reply.usage.completion_tokens <= 48
        chunks = list(client.stream(CAPITAL_QUESTION, max_tokens=48))
        assert "".join(c.text for c in chunks) == reply.text  # greedy: the same tokens
        assert len(chunks) > 1
        vectors = client.embed(["hello world"]).vectors
        assert len(vectors[0]) == 384


async def test_async_client_keeps_a_conversation(mesh: Mesh) -> None:
    async with AsyncClient(mesh.spec.address("router"), timeout=180) as client:
        session = await client.create_session("e2e-client")
        await client.generate("My name is Alice.", session_id=session.session_id, max_tokens=24)
        history = await client.history(session.session_id)
        assert history[0].content == "My name is Alice."
        assert len(history) == 2


def test_a_batch_survives_its_router_being_killed(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = mesh.spec.address("router")
    path = tmp_path / "questions.jsonl"
    path.write_text(
        "".join(
            json.dumps({"custom_id": cid, "messages": q, "max_tokens": 24}) + "\n" for cid, q in QUESTIONS
        )
    )
    assert cli.main(["--address", address, "batch", "submit", str(path), "--no-wait"]) == 0
    batch_id = capsys.readouterr().out.split()[1].rstrip(":")

    pid = mesh.running()["router"]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # reaped, so the launcher sees it gone
    mesh.start()  # starts the router again (the other services still run)
    asyncio.run(mesh.wait_ready(timeout=120))

    code = cli.main(["--address", address, "batch", "status", batch_id, "--watch", "--interval", "0.5"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith(": succeeded, 4/4 done, 0 failed")
    with Client(address, timeout=30) as client:
        job = client.get_batch(batch_id)
        results = list(client.batch_results(batch_id))
    assert job.state is BatchState.SUCCEEDED
    assert [r.custom_id for r in results] == [cid for cid, _ in QUESTIONS]
    assert all(r.ok and r.text and r.usage.completion_tokens > 0 for r in results)
    assert "Paris" in results[0].text
