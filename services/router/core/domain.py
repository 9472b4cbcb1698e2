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
    decode_step_batch: float = 0.0  # mean batch of the fitted steps (0: not said)


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
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)
    logprobs: bool = False  # return each chosen token's log-probability

    @property
    def deterministic(self) -> bool:
        """Greedy (temperature unset or 0) or seeded: the same request gives the same tokens."""
        return self.seed is not None or not self.temperature


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
    stop_token_ids: tuple[int, ...] = ()
    allow_fallback: bool = False  # may be answered by a smaller model under overload


@dataclass(frozen=True)
class GenerateCall:
    """One Generate as the pipeline takes it: the request and who asked, by which method."""

    params: GenerateParams
    tenant: str
    key_prefix: str = ""  # of the caller's API key ("" when authentication is off)
    method: str = ""  # the RPC it came in by (audit records)
    time_remaining: float | None = None  # the gRPC deadline; None: none


@dataclass(frozen=True)
class WorkerRequest:
    """What a worker is asked to generate: the conversation with its history merged in."""

    request_id: str
    model: str
    max_tokens: int
    messages: tuple[ChatTurn, ...] = ()
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    priority: int = 0


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token, stop token or stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"

    @property
    def normal(self) -> bool:
        """The reply is complete: it can be recorded and kept."""
        return self in (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Delta:
    """One piece of a reply as its source (a worker, the reply cache) produced it."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish: FinishReason | None = None  # set on the last piece only
    usage: Usage | None = None  # on the last piece
    model: str = ""  # the model that produced it, where the source says


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


@dataclass(frozen=True)
class ReplyChunk:
    """One message of a Generate reply as the client receives it."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish: FinishReason | None = None
    usage: Usage | None = None
    model: str = ""  # on the first message
    session_id: str = ""  # on the first message
    worker: str = ""  # on the first message from each worker that served it
    # What applied, on the message where it became known (the ladder's steps on the first).
    degraded: tuple[Degradation, ...] = ()
