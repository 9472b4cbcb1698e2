"""One engine step over many sequences: schedule, run the batch through the model, take the samples.

The device side of continuous batching: the pure scheduler picks the chunks, this
runs them as one flattened batch over the paged KV cache and samples for every
sequence whose chunk reached its end. Runs on the model thread; no asyncio here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from services.worker.core.scheduler import SchedulerOutput
from services.worker.model.kernels import Kernel, KernelPlan
from services.worker.model.llama import LlamaModel
from services.worker.model.paged_kv_cache import PagedForwardContext, PagedKVCache
from services.worker.sampler import sample_rows
from services.worker.sequence import GenSequence
from services.worker.step import StepInterrupted

# Past this share of the layers, finishing the pass is cheaper than running it again.
_INTERRUPTIBLE_SHARE = 0.75


class BatchRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, plan: KernelPlan | None = None) -> None:
        self.model = model
        self.cache = cache
        # Which kernel a step of n token rows runs; default: dense in the weights' dtype.
        self.plan = plan or KernelPlan.single(Kernel("dense", model.embed_tokens.weight.dtype))

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        seqs: Mapping[str, GenSequence],
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[str, tuple[int, float | None]]:
        """Run every scheduled chunk; sampled (token, logprob) of each chunk that ends its sequence.

        `interrupt` is asked between layers (the first three quarters of them); True gives the
        pass up with `StepInterrupted`.
        """
        if not out.chunks:
            return {}
        device = self.cache.device
        ids = torch.tensor([[t for c in out.chunks for t in c.token_ids]], dtype=torch.long, device=device)
        positions = torch.tensor(
            [[p for c in out.chunks for p in range(c.start, c.start + len(c.token_ids))]], dtype=torch.long
        )
        kernel = self.plan.kernel_for(ids.shape[1])
        x = self.model.embed_tokens(ids)
        ctx = PagedForwardContext.build(
            self.cache,
            [(c.start, len(c.token_ids), c.block_table) for c in out.chunks],
            self.model.rope(positions.to(device), x.dtype),
            kernel,
        )
        hidden = self.model.run_layers(x, ctx, None if interrupt is None else self._checkpoint(interrupt))[0]
        sampling = [
            (c.request_id, span.end - 1) for c, span in zip(out.chunks, ctx.spans, strict=True) if c.sample
        ]
        if not sampling:
            return {}
        # Only the rows that sample pay for the vocabulary projection.
        rows = torch.tensor([row for _, row in sampling], device=device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        picked = sample_rows(logits, [seqs[request_id] for request_id, _ in sampling])
        return {request_id: result for (request_id, _), result in zip(sampling, picked, strict=True)}

    def _checkpoint(self, interrupt: Callable[[], bool]) -> Callable[[int], None]:
        last = int(len(self.model.layers) * _INTERRUPTIBLE_SHARE)

        def before_layer(i: int) -> None:
            if i < last and interrupt():
                raise StepInterrupted(f"given up before layer {i}")

        return before_layer
