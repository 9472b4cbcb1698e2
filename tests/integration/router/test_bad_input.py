"""Every bad input gets INVALID_ARGUMENT naming the field and the limit; the router keeps serving."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import CHAT_MODEL, EMBED_MODEL
from tests.integration.router.helpers import chat_request, collect, text_of, user

S = common_pb2.SamplingParams
CHAT = CHAT_MODEL

BAD_GENERATE: list[tuple[str, Any, str]] = [
    ("neither", router_pb2.GenerateRequest(), "messages: must not be empty"),
    ("both", router_pb2.GenerateRequest(messages=[user("a")], prompt="b"), "prompt: set exactly one"),
    ("empty prompt", router_pb2.GenerateRequest(prompt=""), "prompt: must not be empty"),
    (
        "no role",
        router_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(content="x")]),
        "messages[0].role: must be set",
    ),
    (
        "unknown model",
        chat_request(model="gpt-9"),
        f"unknown model 'gpt-9' (known chat models: {CHAT})",
    ),
    ("embedding model", chat_request(model=EMBED_MODEL), f"is not one of the chat models ({CHAT})"),
    ("max_tokens 0", chat_request(max_tokens=0), "max_tokens: must be between 1 and 512"),
    (
        "max_tokens over context",
        chat_request(max_tokens=513),
        f"between 1 and 512 (the context length of {CHAT})",
    ),
    ("temperature", chat_request(sampling=S(temperature=-0.5)), "sampling.temperature: must be >= 0"),
    ("temperature nan", chat_request(sampling=S(temperature=math.nan)), "sampling.temperature: must be >= 0"),
    ("top_p 0", chat_request(sampling=S(top_p=0.0)), "sampling.top_p: must be in (0, 1]"),
    ("top_p big", chat_request(sampling=S(top_p=1.5)), "sampling.top_p: must be in (0, 1]"),
    ("min_p", chat_request(sampling=S(min_p=1.0)), "sampling.min_p: must be in [0, 1)"),
    ("top_k", chat_request(sampling=S(top_k=-1)), "sampling.top_k: must be >= 0"),
    ("penalty", chat_request(sampling=S(repetition_penalty=0.0)), "sampling.repetition_penalty: must be > 0"),
    ("stop empty", chat_request(stop=["ok", ""]), "stop[1]: must not be empty"),
    ("too many stops", chat_request(stop=[f"s{i}" for i in range(17)]), "stop: at most 16 stop strings"),
    ("priority", chat_request(priority=9), "priority: unknown priority 9"),
    ("request_id", chat_request(request_id="r" * 129), "request_id: must be at most 128 characters"),
    (
        "session with prompt",
        router_pb2.GenerateRequest(prompt="x", session_id="s1"),
        "session_id: sessions need chat messages",
    ),
    ("empty session id", chat_request(session_id=""), "session_id: must not be empty"),
]


@pytest.mark.parametrize(
    ("request_pb", "message"), [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE]
)
async def test_bad_generate_is_invalid_argument(mesh: Mesh, request_pb: Any, message: str) -> None:
    sent_before = sum(len(w.requests) for w in mesh.workers)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(mesh.stub, request_pb, timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert sum(len(w.requests) for w in mesh.workers) == sent_before  # rejected before any worker
    # Still serving after the bad input.
    assert text_of(await collect(mesh.stub, chat_request("still here"), timeout=5)) == "echo: still here"


BAD_OTHER: list[tuple[str, str, Any, str]] = [
    ("embed nothing", "Embed", router_pb2.EmbedRequest(), "inputs: must not be empty"),
    ("embed too many", "Embed", router_pb2.EmbedRequest(inputs=["x"] * 257), "inputs: at most 256 inputs"),
    (
        "embed chat model",
        "Embed",
        router_pb2.EmbedRequest(model=CHAT, inputs=["x"]),
        "not one of the embedding",
    ),
    ("get no id", "GetSession", router_pb2.GetSessionRequest(), "session_id: must not be empty"),
    ("history no id", "GetHistory", router_pb2.GetHistoryRequest(), "session_id: must not be empty"),
    ("delete no id", "DeleteSession", router_pb2.DeleteSessionRequest(), "session_id: must not be empty"),
    (
        "append nothing",
        "AppendMessages",
        router_pb2.AppendMessagesRequest(session_id="s"),
        "messages: must not be empty",
    ),
    (
        "append no role",
        "AppendMessages",
        router_pb2.AppendMessagesRequest(session_id="s", messages=[common_pb2.NewMessage(content="x")]),
        "messages[0].role: must be set",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_pb", "message"), [c[1:] for c in BAD_OTHER], ids=[c[0] for c in BAD_OTHER]
)
async def test_bad_unary_is_invalid_argument(mesh: Mesh, method: str, request_pb: Any, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(mesh.stub, method)(request_pb, timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    models = await mesh.stub.ListModels(router_pb2.ListModelsRequest(), timeout=5)
    assert models.default_chat_model == CHAT


async def test_bad_export_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect_export(mesh, router_pb2.ExportUserDataRequest())
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id: must not be empty" in (err.value.details() or "")


async def collect_export(mesh: Mesh, request: router_pb2.ExportUserDataRequest) -> list[Any]:
    return [item async for item in mesh.stub.ExportUserData(request, timeout=5)]
