"""Plain values the embedder's core works with; `convert` maps them to and from protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.common.device import DeviceStats
from services.common.model_card import ModelCard

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
class LoadSnapshot:
    model: ModelCard
    device: DeviceStats
    running: int
    waiting: int
    running_tokens: int
    waiting_tokens: int
    items_per_s: float
    draining: bool
    # Share of inputs answered from the result cache since start (0 without a cache).
    cache_hit_rate: float = 0.0
