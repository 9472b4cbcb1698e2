"""The sync and asyncio clients against a real router in front of fake endpoints."""

from __future__ import annotations

import asyncio

import pytest

from infermesh.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    FinishReason,
    InvalidArgument,
    Message,
    NotFound,
    Role,
)
from tests.integration.client.conftest import Mesh
from tests.integration.router.fakes import CHAT_MODEL, EMBED_DIM, EMBED_MODEL, FakeEmbedder
from tests.integration.router.helpers import free_port


async def test_sync_generate_returns_a_typed_completion(mesh: Mesh) -> None:
    def call() -> object:
        with Client(mesh.address, timeout=10) as client:
            return client.generate("one two three", max_tokens=3, seed=7)

    completion = await asyncio.to_thread(call)
    assert completion.text == "echo: one two "  # type: ignore[attr-defined]
    assert completion.finish_reason is FinishReason.LENGTH  # type: ignore[attr-defined]
    assert completion.usage.completion_tokens == 3  # type: ignore[attr-defined]
    assert completion.model == CHAT_MODEL  # type: ignore[attr-defined]
    assert completion.worker in {s.address for s in mesh.worker_servers}  # type: ignore[attr-defined]
    sent = next(r for w in mesh.workers for r in w.requests if r.request_id == completion.request_id)  # type: ignore[attr-defined]
    assert (sent.max_tokens, sent.sampling.seed) == (3, 7)


async def test_sync_stream_yields_chunks_in_order(mesh: Mesh) -> None:
    def call() -> list[object]:
        with Client(mesh.address, timeout=10) as client:
            return list(client.stream([Message(Role.USER, "a b c")], max_tokens=10))

    chunks = await asyncio.to_thread(call)
    assert [c.text for c in chunks] == ["echo: ", "a ", "b ", "c"]  # type: ignore[attr-defined]
    assert chunks[-1].finish_reason is FinishReason.STOP  # type: ignore[attr-defined]
    assert all(c.finish_reason is None for c in chunks[:-1])  # type: ignore[attr-defined]


async def test_async_client_generate_embed_and_session(mesh: Mesh) -> None:
    async with AsyncClient(mesh.address, timeout=10) as client:
        session = await client.create_session("alice", metadata={"team": "search"})
        first = await client.generate(
            [{"role": "system", "content": "be brief"}, "hello"], session_id=session.session_id
        )
        assert first.text == "echo: hello" and first.session_id == session.session_id
        history = await client.history(session.session_id)
        assert [(m.role, m.content) for m in history] == [
            (Role.SYSTEM, "be brief"),
            (Role.USER, "hello"),
            (Role.ASSISTANT, "echo: hello"),
        ]
        assert [m.seq for m in history] == [1, 2, 3]
        assert (await client.get_session(session.session_id)).metadata == {"team": "search"}

        vectors = await client.embed(["alpha", "beta"])
        assert vectors.model == EMBED_MODEL
        assert len(vectors.vectors) == 2 and len(vectors.vectors[0]) == EMBED_DIM
        assert vectors.vectors[0] == pytest.approx(FakeEmbedder.vector("alpha"))

        models = await client.list_models()
        assert models.default_chat_model == CHAT_MODEL
        assert {m.id: m.kind for m in models.models} == {CHAT_MODEL: "chat", EMBED_MODEL: "embedding"}
        status = await client.cluster_status()
        assert {e.kind for e in status.endpoints} == {"worker", "embedder", "session"}
        assert await client.health() == "SERVING"

        await client.delete_session(session.session_id)
        with pytest.raises(NotFound):
            await client.get_session(session.session_id)


async def test_bad_input_raises_invalid_argument_naming_the_field(mesh: Mesh) -> None:
    async with AsyncClient(mesh.address, timeout=10) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.generate("hi", temperature=-1.0)
    assert caught.value.details.startswith("sampling.temperature: must be >= 0")
    with pytest.raises(ValueError, match="role 'robot'"):
        await AsyncClient(mesh.address).generate([{"role": "robot", "content": "x"}])


async def test_deadline_is_the_call_timeout(mesh: Mesh) -> None:
    for worker in mesh.workers:
        worker.token_delay_s = 0.5
    try:
        async with AsyncClient(mesh.address) as client:
            with pytest.raises(DeadlineExceeded):
                await client.generate("slow words here", timeout=0.3)
    finally:
        for worker in mesh.workers:
            worker.token_delay_s = 0.0


async def test_unreachable_router_names_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, timeout=5) as client:
        with pytest.raises(ConnectionFailed) as caught:
            await client.list_models()
    assert caught.value.address == address
    assert address in str(caught.value) and "make up" in str(caught.value)

    def sync_call() -> None:
        with Client(address, timeout=5) as client:
            client.generate("hi")

    with pytest.raises(ConnectionFailed):
        await asyncio.to_thread(sync_call)
