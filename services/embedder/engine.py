"""The embedder's request logic: validate, count tokens, batch, normalise.

No grpc or protobuf here; the model is anything with the `EncoderModel` shape,
so tests can run it with a fake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.common.device import DeviceStats
from services.common.errors import InvalidArgument
from services.common.model_card import ModelCard
from services.embedder.batcher import Batcher
from services.embedder.domain import (
    EmbeddedItem,
    EmbedQuery,
    EmbedResult,
    LoadSnapshot,
    Vector,
)

logger = logging.getLogger(__name__)

# torch.nn.functional.normalize's eps, so normalised vectors match sentence-transformers'.
_NORM_EPS = 1e-12
WARMUP_TEXT = "warm-up"
# WordPiece turns a word longer than this into one [UNK]; past max_seq_length x this many
# characters only pathological (whitespace-padded) text still has tokens the model would see.
CHARS_PER_TOKEN_BOUND = 100


class EncoderModel(Protocol):
    @property
    def max_seq_length(self) -> int: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included, without truncation."""
        ...

    def encode(self, texts: list[str]) -> Sequence[Vector]:
        """Raw (unnormalised) vectors, one per text; over-long texts truncated."""
        ...

    def describe(self, model_id: str) -> ModelCard: ...

    def device(self) -> DeviceStats: ...


class EmbedEngine:
    """Validates and answers embed queries through one shared `Batcher`."""

    def __init__(
        self,
        model: EncoderModel,
        *,
        model_id: str,
        max_items_per_request: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_input_chars: int = 0,
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.max_items_per_request = max_items_per_request
        self.max_input_chars = max_input_chars or CHARS_PER_TOKEN_BOUND * model.max_seq_length
        self.description = model.describe(model_id)
        self._batcher: Batcher[Vector] = Batcher(
            model.encode, max_batch_tokens=max_batch_tokens, max_wait_s=max_wait_s
        )
        # Tokenising has its own thread so long inputs neither block the event loop nor
        # wait behind a running batch.
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenize"
        )
        self._draining = asyncio.Event()

    async def start(self) -> None:
        """Start batching and run one embedding through the whole path."""
        self._batcher.start()
        await self.embed(EmbedQuery(inputs=[WARMUP_TEXT]))

    def validate(self, query: EmbedQuery) -> None:
        """Checks that need no tokeniser; raise InvalidArgument naming the field and the limit."""
        if query.model and query.model != self.model_id:
            raise InvalidArgument(
                "model",
                f"unknown model {query.model!r}: this embedder serves {self.model_id!r} (or leave it empty)",
            )
        if not query.inputs:
            raise InvalidArgument("inputs", "must hold at least 1 input")
        if len(query.inputs) > self.max_items_per_request:
            raise InvalidArgument(
                "inputs",
                f"{len(query.inputs)} inputs is over the limit of {self.max_items_per_request} per request; "
                "split the request",
            )
        for i, text in enumerate(query.inputs):
            if not text:
                raise InvalidArgument(f"inputs[{i}]", "must not be empty")

    async def embed(self, query: EmbedQuery) -> EmbedResult:
        self.validate(query)
        texts = self._cut(query)
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(self._tokenizer_thread, self.model.count_tokens, texts)
        limit = self.model.max_seq_length
        if not query.truncate:
            for i, count in enumerate(counts):
                if count > limit:
                    raise InvalidArgument(
                        f"inputs[{i}]",
                        f"{count} tokens is over the model's limit of {limit} tokens; "
                        "shorten it or set truncate=true",
                    )
        used = [min(count, limit) for count in counts]
        vectors = await self._batcher.submit(texts, used)
        items = [
            EmbeddedItem(
                vector=normalize(vector) if query.normalize else vector,
                truncated=count > limit or len(text) < len(original),
                token_count=n,
            )
            for vector, count, n, text, original in zip(
                vectors, counts, used, texts, query.inputs, strict=True
            )
        ]
        logger.debug("embedded %d inputs, %d tokens", len(items), sum(used))
        return EmbedResult(model=self.model_id, items=items)

    def _cut(self, query: EmbedQuery) -> list[str]:
        """Inputs cut to max_input_chars (truncate=true), or InvalidArgument for the first too long."""
        limit = self.max_input_chars
        if not query.truncate:
            for i, text in enumerate(query.inputs):
                if len(text) > limit:
                    raise InvalidArgument(
                        f"inputs[{i}]",
                        f"{len(text)} characters is over the limit of {limit} characters; "
                        "shorten it or set truncate=true",
                    )
        return [text[:limit] for text in query.inputs]

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    async def wait_draining(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; return early (True) once draining starts."""
        try:
            await asyncio.wait_for(self._draining.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def load(self) -> LoadSnapshot:
        batcher = self._batcher.load()
        return LoadSnapshot(
            model=self.description,
            device=self.model.device(),
            running=batcher.running,
            waiting=batcher.waiting,
            running_tokens=batcher.running_tokens,
            waiting_tokens=batcher.waiting_tokens,
            items_per_s=batcher.items_per_s,
            draining=self.draining,
        )

    async def drain(self) -> None:
        """Finish what is queued; load reports say draining from now on."""
        self._draining.set()
        await self._batcher.drain()

    async def close(self) -> None:
        self._draining.set()
        await self._batcher.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def normalize(vector: Vector) -> Vector:
    """Unit length, as sentence-transformers' normalize_embeddings does it."""
    norm = float(np.linalg.norm(vector))
    return (vector / max(norm, _NORM_EPS)).astype(np.float32, copy=False)
