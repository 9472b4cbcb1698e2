"""Typed results of the Python client: plain dataclasses, no protobuf in sight."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypedDict


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Priority(enum.StrEnum):
    CRITICAL = "critical"
    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"


class FinishReason(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


class BatchState(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (BatchState.SUCCEEDED, BatchState.FAILED, BatchState.CANCELLED)


@dataclass(frozen=True)
class Message:
    role: Role | str
    content: str


# What callers may pass as a conversation: "text" is one user message.
MessageLike = Message | Mapping[str, str] | str


class GenerateOptions(TypedDict, total=False):
    """Keyword options of `generate` and `stream`."""

    prompt: str  # raw text without chat template, instead of messages
    model: str  # catalog id; empty = the router's default chat model
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    priority: Priority | str
    session_id: str  # continue (and record into) this session
    request_id: str
    allow_fallback: bool  # may be served by a smaller model under overload
    deadline: datetime  # absolute; the call's timeout applies as well


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Degradation:
    step: str
    reason: str


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a reply; the last one carries finish_reason and usage."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    request_id: str = ""
    model: str = ""
    worker: str = ""
    session_id: str = ""
    degraded: tuple[Degradation, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A whole reply."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    request_id: str
    model: str
    worker: str = ""
    session_id: str = ""
    degraded: tuple[Degradation, ...] = ()
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Embedding:
    values: tuple[float, ...]
    truncated: bool
    token_count: int


@dataclass(frozen=True)
class Embeddings:
    model: str
    embeddings: tuple[Embedding, ...]
    usage: Usage

    @property
    def vectors(self) -> list[list[float]]:
        return [list(e.values) for e in self.embeddings]


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    model: str
    last_seq: int
    created_at: datetime | None
    updated_at: datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retention_days: int = 0


@dataclass(frozen=True)
class HistoryMessage:
    seq: int
    role: Role | str
    content: str
    token_count: int
    created_at: datetime | None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    kind: str
    context_length: int
    embedding_dim: int = 0
    family: str = ""
    tier: str = ""


@dataclass(frozen=True)
class Models:
    models: tuple[ModelInfo, ...]
    default_chat_model: str
    default_embedding_model: str


@dataclass(frozen=True)
class EndpointStatus:
    address: str
    kind: str  # worker, embedder or session
    healthy: bool
    detail: str
    has_load: bool = False  # whether the load fields below were reported
    running: int = 0
    waiting: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    tokens_per_s: float = 0.0  # decode tokens/s (workers) or inputs/s (embedders)
    report_age_ms: int = 0


@dataclass(frozen=True)
class ClusterStatus:
    router_id: str
    endpoints: tuple[EndpointStatus, ...]
    queue_depths: Mapping[str, int]


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch job; `custom_id` matches it to its result."""

    custom_id: str
    messages: Sequence[MessageLike] = ()
    prompt: str | None = None
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class BatchJob:
    batch_id: str
    display_name: str
    state: BatchState
    total: int
    completed: int
    failed: int
    created_at: datetime | None
    finished_at: datetime | None

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def processed(self) -> int:
        return self.completed + self.failed


@dataclass(frozen=True)
class BatchResult:
    custom_id: str
    index: int
    text: str
    finish_reason: FinishReason
    usage: Usage
    error_code: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_code
