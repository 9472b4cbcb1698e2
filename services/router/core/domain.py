"""Plain values the router's core works on: models, load reports, chat turns and requests.

`convert` builds them from protobuf messages; nothing here knows about gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EndpointKind(enum.Enum):
    WORKER = "worker"
    EMBEDDER = "embedder"
    SESSION = "session"


class ModelKind(enum.Enum):
    UNSPECIFIED = "unspecified"
    CHAT = "chat"
    EMBEDDING = "embedding"


class ChatRole(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: ModelKind
    context_length: int = 0
    embedding_dim: int = 0
    family: str = ""
    tier: str = ""
    source: str = ""
    description: str = ""
    device_type: str = ""  # needed device ("cpu", "cuda", "mps"); "" = any
    min_memory_bytes: int = 0  # device memory needed


@dataclass(frozen=True)
class DeviceSpec:
    type: str = ""
    name: str = ""
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    dtype: str = ""


@dataclass(frozen=True)
class LoadSnapshot:
    """One load report of a worker or embedder."""

    endpoint_id: str = ""
    at: float = 0.0  # unix seconds at the endpoint; 0 when it did not say
    models: tuple[ModelSpec, ...] = ()
    device: DeviceSpec = field(default_factory=DeviceSpec)
    running: int = 0
    waiting: int = 0
    running_tokens: int = 0
    waiting_tokens: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    items_per_s: float = 0.0
    draining: bool = False
    # Decode step seconds = fixed + per_sequence * batch, as the worker measured it (0: not yet).
    decode_step_fixed_s: float = 0.0
    decode_step_per_sequence_s: float = 0.0


@dataclass(frozen=True)
class ChatTurn:
    role: ChatRole | None  # None: the caller left it unset
    content: str


@dataclass(frozen=True)
class HistoryMessage:
    """A stored session message, as a window returns it."""

    role: ChatRole | None
    content: str
    client_msg_id: str = ""
    token_count: int = 0


@dataclass(frozen=True)
class NewTurn:
    """A message to append to a session."""

    role: ChatRole
    content: str
    client_msg_id: str
    token_count: int = 0


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class GenerateParams:
    """The parts of a Generate request the router checks and acts on."""

    model: str = ""
    messages: tuple[ChatTurn, ...] = ()
    prompt: str | None = None
    session_id: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    priority: int = 0
    deadline: float | None = None  # unix seconds
    request_id: str = ""


@dataclass(frozen=True)
class EmbedParams:
    model: str = ""
    inputs: tuple[str, ...] = ()
    request_id: str = ""


class DegradationStep(enum.Enum):
    MAX_TOKENS_CAPPED = "max_tokens_capped"
    FALLBACK_MODEL = "fallback_model"
    CACHED_REPLY = "cached_reply"
    HISTORY_UNAVAILABLE = "history_unavailable"
    FAILOVER = "failover"


@dataclass(frozen=True)
class Degradation:
    step: DegradationStep
    reason: str
