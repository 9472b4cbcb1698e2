"""The loaded model on its device, and one sequence at a time through a contiguous cache.

The serving engine batches through `BatchRunner` on a paged cache; this one-sequence
path is the plain reference the batched one is checked against. Every method runs
on the model thread; nothing here knows about asyncio.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.worker.model.args import ModelArgs
from services.worker.model.kernel_bench import load_or_measure
from services.worker.model.kernels import Kernel, KernelPlan
from services.worker.model.kv_cache import ContiguousKVCache
from services.worker.model.llama import LlamaModel
from services.worker.model.loader import LoadedWeights, load_weights
from services.worker.sampler import sample
from services.worker.sequence import GenSequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What the runner chooses its kernels among, and how big its steps get."""

    candidates: tuple[Kernel, ...]
    # Most token rows of one step (the batch token budget), and most rows that sample (seats).
    max_rows: int
    max_sampled_rows: int
    # Where a measured plan is kept between starts; None: measure every time.
    cache_dir: Path | None = None
    # Quantise weights the file did not ship quantised (weights="int4"/"int8" asked for it);
    # otherwise a quantised kernel runs those dense.
    quantize: bool = False


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        plan: KernelPlan | None = None,
    ) -> None:
        self.model = model
        self.args: ModelArgs = model.args
        self.device = device
        # The loaded weights' dtype; the kernels a step runs are `plan`'s.
        self.dtype = dtype
        self.max_context = max_context
        self.plan = plan or KernelPlan.single(Kernel("dense", dtype))
        self._cache: ContiguousKVCache | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """Attention and its KV cache stay in the model's dtype whatever the kernels multiply in."""
        return self.dtype

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
        cls,
        weights: LoadedWeights,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        kernels: KernelChoice | None = None,
    ) -> ModelRunner:
        """The model on its device; with `kernels`, packed for and planned among those kernels."""
        # Built on the meta device: no memory or time goes into a random init the weights overwrite.
        with torch.device("meta"):
            model = LlamaModel(weights.args, max_positions=max_context)
        model = model.to(dtype).to_empty(device=device)
        model.load_hf_tensors(
            {k: v.to(device=device, dtype=dtype) for k, v in weights.tensors.items()}, weights.q4
        )
        model.place_rope(device)
        model.eval()
        if kernels is None:
            model.drop_originals()
            return cls(model, device, dtype, max_context)
        model.pack(frozenset(kernels.candidates), quantize=kernels.quantize)
        plan = load_or_measure(
            model,
            kernels.candidates,
            max_rows=kernels.max_rows,
            max_sampled_rows=kernels.max_sampled_rows,
            cache_dir=kernels.cache_dir,
        )
        # Only what the plan runs stays in memory.
        model.pack(frozenset(plan.kernels), quantize=kernels.quantize)
        model.drop_originals()
        return cls(model, device, dtype, max_context, plan)

    @classmethod
    def load(
        cls,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int = 0,
        kernels: KernelChoice | Callable[[LoadedWeights], KernelChoice] | None = None,
    ) -> tuple[ModelRunner, LoadedWeights]:
        """`kernels` may depend on the file (what it ships quantised): a function of the weights."""
        started = time.perf_counter()
        weights = load_weights(path, dtype)
        choice = kernels(weights) if callable(kernels) else kernels
        runner = cls.from_weights(weights, device, dtype, max_context or weights.args.context_length, choice)
        logger.info(
            "model loaded",
            extra={
                "source": weights.source,
                "seconds": round(time.perf_counter() - started, 2),
                "device": str(device),
                "kernels": runner.plan.describe(),
            },
        )
        weights.tensors.clear()
        weights.q4.clear()
        return runner, weights

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], start: int, kernel: Kernel | None = None) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] of every position of the chunk (dense in the
        weights' dtype, or as `kernel` runs it)."""
        kernel = kernel or self.plan.kernel_for(len(token_ids))
        return self.model.compute_logits(self._hidden(token_ids, start, kernel))[0]

    @torch.inference_mode()
    def sample_next(self, seq: GenSequence, token_ids: Sequence[int], start: int) -> tuple[int, float | None]:
        """Run the chunk that ends the sequence's known tokens and sample what follows."""
        kernel = self.plan.kernel_for(len(token_ids))
        hidden = self._hidden(token_ids, start, kernel)
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

    def _hidden(self, token_ids: Sequence[int], start: int, kernel: Kernel | None = None) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        return self.model(ids, positions, self.cache, start, kernel or self.plan.kernel_for(ids.shape[1]))
