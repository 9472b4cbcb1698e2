"""What a worker or embedder says about the model it serves, in GetInfo and load reports."""

from __future__ import annotations

import dataclasses
from typing import Literal

ModelKind = Literal["chat", "embedding"]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    id: str
    kind: ModelKind
    context_length: int
    family: str
    tier: str
    # Where the weights came from: a file or folder name, never a full path.
    source: str
    embedding_dim: int = 0  # embedding models only
