"""The Generate pipeline on plain values (no server, no network): its steps run in the order
`services/router/pipeline.py` writes down, and the session records the redacted reply the client
was sent, before the client sees the end of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.common.config import load_config
from services.common.errors import InvalidArgument
from services.common.tls import TlsConfig
from services.router.audit import AuditSink
from services.router.call_guard import CallGuard
from services.router.config import RouterConfig
from services.router.core.domain import (
    ChatRole,
    ChatTurn,
    Delta,
    FinishReason,
    GenerateCall,
    GenerateParams,
    HistoryMessage,
    ModelKind,
    ModelSpec,
    NewTurn,
    Usage,
    WorkerRequest,
)
from services.router.core.placement import Ask
from services.router.failover import Relayed
from services.router.pipeline import Pipeline
from services.router.server import create_endpoints, create_quotas

MODEL = "chat-model"
SECRET = "write to bob@example.com"


@dataclass
class Log:
    events: list[str] = field(default_factory=list)
    recorded: list[Sequence[NewTurn]] = field(default_factory=list)


class RecordingGuard(CallGuard):
    def __init__(self, log: Log, config: RouterConfig) -> None:
        super().__init__(config.guard.policy(), create_quotas(config), AuditSink(None, timeout_s=1.0))
        self.log = log

    def check_input(self, call: GenerateCall) -> GenerateParams:
        self.log.events.append("guard input")
        return super().check_input(call)

    async def reserve_generate(self, call: GenerateCall, chars: int, max_tokens: int) -> Any:
        self.log.events.append("reserve")
        return await super().reserve_generate(call, chars, max_tokens)

    async def settle(self, reservation: Any, used: int) -> None:
        self.log.events.append("settle")
        await super().settle(reservation, used)


class FakeSessions:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def window(
        self, tenant: str, session_id: str, token_budget: int, remaining: float | None
    ) -> list[HistoryMessage]:
        self.log.events.append("history")
        return [
            HistoryMessage(ChatRole.USER, "earlier question"),
            HistoryMessage(ChatRole.ASSISTANT, "earlier"),
        ]

    async def append_turns(
        self, tenant: str, session_id: str, turns: Sequence[NewTurn], remaining: float | None
    ) -> None:
        self.log.events.append("record")
        self.log.recorded.append(turns)


class FakeFailover:
    """A worker that answers with an e-mail address in its reply."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.requests: list[WorkerRequest] = []

    async def stream(self, request: WorkerRequest, ask: Ask, remaining: Any) -> AsyncIterator[Relayed]:
        self.log.events.append("relay")
        self.requests.append(request)
        for piece in ("Sure: ", "write to bob@", "example.com today"):
            yield Relayed(Delta(piece, (1,)), "worker-1")
        yield Relayed(Delta("", (2,), finish=FinishReason.STOP, usage=Usage(20, 4)), "worker-1")


@pytest.fixture
def pipeline_and_log() -> tuple[Pipeline, Log, FakeFailover]:
    config = load_config(
        RouterConfig,
        "router",
        env={},
        overrides={"guard_pii_input": True, "guard_pii_output": True, "quota_tokens_per_minute": 100_000},
    )
    log = Log()
    endpoints = create_endpoints(config, TlsConfig())
    endpoints.registry.configure_models([ModelSpec(MODEL, ModelKind.CHAT, context_length=2048)])
    pipeline = Pipeline(config, endpoints, FakeSessions(log), RecordingGuard(log, config))  # type: ignore[arg-type]
    failover = FakeFailover(log)
    pipeline.failover = failover  # type: ignore[assignment]
    plan, slot = pipeline.overload.plan, pipeline.admission.slot

    async def planned(*args: Any, **kwargs: Any) -> Any:
        log.events.append("plan")
        return await plan(*args, **kwargs)

    @asynccontextmanager
    async def admitted(*args: Any, **kwargs: Any) -> AsyncIterator[None]:
        log.events.append("admit")
        async with slot(*args, **kwargs):
            yield

    pipeline.overload.plan = planned  # type: ignore[method-assign]
    pipeline.admission.slot = admitted  # type: ignore[method-assign]
    return pipeline, log, failover


def call(**params: Any) -> GenerateCall:
    defaults: dict[str, Any] = {
        "model": MODEL,
        "messages": (ChatTurn(ChatRole.USER, f"Please {SECRET}."),),
        "session_id": "s-1",
        "max_tokens": 16,
    }
    return GenerateCall(GenerateParams(**{**defaults, **params}), tenant="acme", time_remaining=30.0)


async def test_steps_run_in_the_written_order(pipeline_and_log: tuple[Pipeline, Log, FakeFailover]) -> None:
    pipeline, log, failover = pipeline_and_log
    chunks = []
    async for chunk in pipeline.generate(call()):
        if chunk.finish is not None:
            log.events.append("client sees the end")
        chunks.append(chunk)
    assert log.events == [
        "guard input",
        "reserve",
        "history",
        "plan",
        "admit",
        "relay",
        "record",
        "client sees the end",
        "settle",
    ]
    # The worker got the history in front, and the caller's turn with its PII redacted.
    sent = failover.requests[0].messages
    assert [m.content for m in sent[:2]] == ["earlier question", "earlier"]
    assert "bob@example.com" not in sent[-1].content


async def test_the_recorded_turn_is_the_redacted_reply_the_client_saw(
    pipeline_and_log: tuple[Pipeline, Log, FakeFailover],
) -> None:
    pipeline, log, _ = pipeline_and_log
    shown = "".join([chunk.text async for chunk in pipeline.generate(call())])
    assert "bob@example.com" not in shown and shown.startswith("Sure: write to ")
    (turns,) = log.recorded
    assert [t.role for t in turns] == [ChatRole.USER, ChatRole.ASSISTANT]
    assert turns[-1].content == shown
    assert "bob@example.com" not in turns[0].content


async def test_an_invalid_request_stops_before_any_other_step(
    pipeline_and_log: tuple[Pipeline, Log, FakeFailover],
) -> None:
    pipeline, log, _ = pipeline_and_log
    with pytest.raises(InvalidArgument) as err:
        async for _ in pipeline.generate(call(max_tokens=10**6)):
            pass
    assert "max_tokens" in str(err.value)
    assert log.events == []


async def test_the_quota_is_settled_when_the_relay_fails(
    pipeline_and_log: tuple[Pipeline, Log, FakeFailover],
) -> None:
    pipeline, log, failover = pipeline_and_log

    async def broken(request: WorkerRequest, ask: Ask, remaining: Any) -> AsyncIterator[Relayed]:
        log.events.append("relay")
        yield Relayed(Delta("partial ", (1,)), "worker-1")
        raise InvalidArgument("prompt", "the worker refused it")

    failover.stream = broken  # type: ignore[method-assign]
    with pytest.raises(InvalidArgument):
        async for _ in pipeline.generate(call()):
            pass
    assert log.events[-2:] == ["relay", "settle"]
    assert "record" not in log.events  # an unfinished reply is not a turn
