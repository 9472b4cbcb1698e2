"""The embedder's request logic: validate, count tokens, batch, normalise.

No grpc or protobuf here; the model is anything with the `EncoderModel` shape,
so tests can run it with a fake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from collections.abc import Sequence
from typing import Protocol, cast

import numpy as np

from services.common.device import DeviceStats
from services.common.errors import InvalidArgument
from services.common.model_card import ModelCard
from services.embedder.batcher import Batcher
from services.embedder.cache import Cached, HitCounter, ResultCache
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
# Inputs this short (in characters, all together) are tokenised on the event loop.
INLINE_TOKENIZE_CHARS = 1024


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
        cache: ResultCache | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.cache_hits = HitCounter()
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
        """Start batching and run one embedding through the model."""
        self._batcher.start()
        await self.probe()

    async def probe(self) -> None:
        """One real embedding through the batcher and the model thread, never from the cache."""
        await self._batcher.submit([WARMUP_TEXT], await self._count_tokens([WARMUP_TEXT]))

    @property
    def batches(self) -> int:
        """Encode calls finished since start."""
        return self._batcher.batches

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
        cached = await self._lookup(texts)
        missing = [i for i, entry in enumerate(cached) if entry is None]
        counts = [0 if entry is None else entry.tokens for entry in cached]
        if missing:
            fresh = await self._count_tokens([texts[i] for i in missing])
            for i, count in zip(missing, fresh, strict=True):
                counts[i] = count
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
        raw: list[Vector | None] = [None if entry is None else entry.vector for entry in cached]
        if missing:
            encoded = await self._batcher.submit([texts[i] for i in missing], [used[i] for i in missing])
            for i, vector in zip(missing, encoded, strict=True):
                raw[i] = vector
            if self.cache is not None:
                await self.cache.put_many(
                    [(texts[i], Cached(v, counts[i])) for i, v in zip(missing, encoded, strict=True)]
                )
        items = [
            EmbeddedItem(
                vector=normalize(vector) if query.normalize else vector,
                truncated=count > limit or len(text) < len(original),
                token_count=n,
            )
            for vector, count, n, text, original in zip(
                cast("list[Vector]", raw), counts, used, texts, query.inputs, strict=True
            )
        ]
        logger.debug(
            "embedded %d inputs, %d tokens, %d from cache", len(items), sum(used), len(texts) - len(missing)
        )
        return EmbedResult(model=self.model_id, items=items)

    async def _lookup(self, texts: list[str]) -> list[Cached | None]:
        if self.cache is None:
            return [None] * len(texts)
        found = await self.cache.get_many(texts)
        self.cache_hits.add(len(texts), sum(entry is not None for entry in found))
        return found

    async def _count_tokens(self, texts: list[str]) -> list[int]:
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            # A hop to the tokenizer thread costs more than tokenising a sentence or two here.
            return self.model.count_tokens(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self.model.count_tokens, texts)

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
            cache_hit_rate=self.cache_hits.ratio,
        )

    async def drain(self) -> None:
        """Finish what is queued; load reports say draining from now on."""
        self._draining.set()
        await self._batcher.drain()

    async def close(self) -> None:
        self._draining.set()
        await self._batcher.close()
        if self.cache is not None:
            logger.info(
                "result cache closed",
                extra={"cache_lookups": self.cache_hits.lookups, "cache_hits": self.cache_hits.hits},
            )
            await self.cache.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def normalize(vector: Vector) -> Vector:
    """Unit length, as sentence-transformers' normalize_embeddings does it."""
    # A dot product: np.linalg.norm's generality costs more than the division on 384 floats.
    norm = math.sqrt(float(np.dot(vector, vector)))
    return (vector / max(norm, _NORM_EPS)).astype(np.float32, copy=False)
