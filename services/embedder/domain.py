"""Plain values the embedder's core works with; `convert` maps them to and from protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EmbedQuery:
    inputs: Sequence[str]
    # Empty selects the default model.
    model: str = ""
    normalize: bool = True
    truncate: bool = True
    request_id: str = ""


@dataclass(frozen=True)
class EmbeddedItem:
    vector: Vector
    truncated: bool
    # Tokens the model saw (after truncation), special tokens included.
    token_count: int


@dataclass(frozen=True)
class EmbedResult:
    model: str
    items: list[EmbeddedItem]

    @property
    def prompt_tokens(self) -> int:
        return sum(item.token_count for item in self.items)


@dataclass(frozen=True)
class ModelDescription:
    id: str
    context_length: int
    embedding_dim: int
    family: str
    tier: str
    # Where the weights came from: a name, never a path.
    source: str


@dataclass(frozen=True)
class DeviceSnapshot:
    type: str  # "cpu", "cuda" or "mps"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    dtype: str


@dataclass(frozen=True)
class LoadSnapshot:
    model: ModelDescription
    device: DeviceSnapshot
    running: int
    waiting: int
    running_tokens: int
    waiting_tokens: int
    items_per_s: float
    draining: bool
