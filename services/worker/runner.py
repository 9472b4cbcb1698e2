"""The loaded model on its device, and one sequence at a time through a contiguous cache.

The serving engine batches through `BatchRunner` on a paged cache; this one-sequence
path is the plain reference the batched one is checked against. Every method runs
on the model thread; nothing here knows about asyncio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from services.worker.model.args import ModelArgs
from services.worker.model.kv_cache import ContiguousKVCache
from services.worker.model.llama import LlamaModel
from services.worker.model.loader import LoadedWeights, load_weights
from services.worker.sampler import sample
from services.worker.sequence import GenSequence

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, device: torch.device, dtype: torch.dtype, max_context: int) -> None:
        self.model = model
        self.args: ModelArgs = model.args
        self.device = device
        self.dtype = dtype
        self.max_context = max_context
        self._cache: ContiguousKVCache | None = None

    @property
    def cache(self) -> ContiguousKVCache:
        """One sequence's cache, for the single-sequence path (reference checks, tools).

        Made on first use: a serving worker runs on the paged cache and never needs it.
        """
        if self._cache is None:
            self._cache = ContiguousKVCache(self.args, self.max_context, self.dtype, self.device)
        return self._cache

    @classmethod
    def from_weights(
        cls, weights: LoadedWeights, device: torch.device, dtype: torch.dtype, max_context: int
    ) -> ModelRunner:
        # Built on the meta device: no memory or time goes into a random init the weights overwrite.
        with torch.device("meta"):
            model = LlamaModel(weights.args, max_positions=max_context)
        model = model.to(dtype).to_empty(device=device)
        model.load_hf_tensors({k: v.to(device=device, dtype=dtype) for k, v in weights.tensors.items()})
        model.place_rope(device)
        model.eval()
        return cls(model, device, dtype, max_context)

    @classmethod
    def load(
        cls, path: Path, device: torch.device, dtype: torch.dtype, max_context: int = 0
    ) -> tuple[ModelRunner, LoadedWeights]:
        started = time.perf_counter()
        weights = load_weights(path, dtype)
        runner = cls.from_weights(weights, device, dtype, max_context or weights.args.context_length)
        logger.info(
            "model loaded",
            extra={
                "source": weights.source,
                "seconds": round(time.perf_counter() - started, 2),
                "device": str(device),
            },
        )
        weights.tensors.clear()
        return runner, weights

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] of every position of the chunk."""
        return self.model.compute_logits(self._hidden(token_ids, start))[0]

    @torch.inference_mode()
    def sample_next(self, seq: GenSequence, token_ids: Sequence[int], start: int) -> tuple[int, float | None]:
        """Run the chunk that ends the sequence's known tokens and sample what follows."""
        hidden = self._hidden(token_ids, start)
        logits = self.model.compute_logits(hidden[0, -1])
        seen = seq.all_ids if seq.sampling.repetition_penalty != 1.0 else ()
        return sample(logits, seq.sampling, seen, seq.seed, seq.step_index)

    def generate(self, seq: GenSequence) -> list[int]:
        """Run one sequence to its end on its own: prefill, then one token at a time."""
        chunk, start = seq.prefix_ids, 0
        while seq.finish is None:
            token, logprob = self.sample_next(seq, chunk, start)
            start += len(chunk)
            seq.append(token, logprob)
            chunk = [token]
        return seq.output_ids

    def _hidden(self, token_ids: Sequence[int], start: int) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        return self.model(ids, positions, self.cache, start)
