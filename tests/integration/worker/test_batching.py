"""Continuous batching on the packaged model (float32): a request gives the same tokens alone
as inside a batch of 16 mixed requests, chunked prefills, preemptions and prefix hits included,
and the same tokens as the one-sequence path that is checked against transformers."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.batch_runner import BatchRunner
from services.worker.core.block_manager import BlockManager
from services.worker.core.scheduler import Scheduler, SchedulerLimits
from services.worker.model.paged_kv_cache import PagedKVCache
from services.worker.request import SamplingParams
from services.worker.runner import ModelRunner
from services.worker.sequence import GenSequence
from services.worker.step import run_step, state_for
from services.worker.tokenizer import Tokenizer
from tests.integration.worker.test_fidelity import chat_ids, generate, gguf, runner, tokenizer

__all__ = ["gguf", "runner", "tokenizer"]  # module-scoped fixtures shared with test_fidelity

pytestmark = pytest.mark.slow

BLOCK = 16
GREEDY = SamplingParams(ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=77, ignore_eos=True)
TARGET_TOKENS = 12
# 128 positions for 16 sequences (the target alone needs 49): preemption is certain.
NUM_BLOCKS = 8


def make_seq(request_id: str, prompt: list[int], n: int, params: SamplingParams) -> GenSequence:
    return GenSequence(
        request_id=request_id,
        prompt_ids=prompt,
        resume_ids=[],
        sampling=params,
        seed=params.seed or 0,
        max_new_tokens=n,
        decode=lambda ids: "",
        eos_ids=(2,),
    )


def drive(
    runner: ModelRunner, arrivals: list[tuple[int, GenSequence]], num_blocks: int
) -> tuple[dict[str, list[int]], int]:
    """Run sequences that arrive at the given steps to the end; their outputs and the preemption count."""
    scheduler = Scheduler(
        BlockManager(num_blocks, BLOCK),
        SchedulerLimits(max_num_seqs=16, max_num_batched_tokens=64, max_prefill_chunk=32),
    )
    cache = PagedKVCache(runner.args, num_blocks, BLOCK, runner.cache_dtype, torch.device("cpu"))
    batch = BatchRunner(runner.model, cache, runner.plan)
    seqs = {seq.request_id: seq for _, seq in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    states = []
    step = 0
    while pending or scheduler.has_work():
        while pending and pending[0][0] <= step:
            seq = pending.pop(0)[1]
            states.append(state_for(seq.request_id, seq))
            scheduler.add(states[-1])
        run_step(scheduler, batch, seqs)
        step += 1
    assert scheduler.blocks.num_used_blocks == 0
    return {rid: seq.output_ids for rid, seq in seqs.items()}, sum(s.num_preemptions for s in states)


def mixed_requests(target: list[int]) -> list[tuple[int, GenSequence]]:
    """15 requests arriving over the first steps: short prompts (the CPU budget of the suite is
    small), greedy and seeded, some with the target's whole prompt (prefix-cache hits)."""
    rng = random.Random(3)
    arrivals = []
    for i in range(15):
        prompt = target if i % 5 == 0 else [rng.randrange(100, 40000) for _ in range(rng.randint(3, 16))]
        params = SamplingParams(temperature=1.0, seed=i, ignore_eos=True) if i % 3 == 0 else GREEDY
        arrivals.append((rng.randint(0, 4), make_seq(f"other-{i}", prompt, rng.randint(2, 8), params)))
    return arrivals


def test_same_tokens_alone_and_in_a_batch_of_16(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    target = chat_ids(tokenizer, "What is the capital of France?")
    seeded = chat_ids(tokenizer, "Write a haiku about the sea.")
    # The one-sequence path over the contiguous cache (compared with transformers in test_fidelity).
    expected = generate(runner, target, TARGET_TOKENS, GREEDY)
    expected_seeded = generate(runner, seeded, TARGET_TOKENS, SEEDED)
    alone, _ = drive(runner, [(0, make_seq("target", target, TARGET_TOKENS, GREEDY))], NUM_BLOCKS)
    assert alone["target"] == expected
    arrivals = [
        (2, make_seq("target", target, TARGET_TOKENS, GREEDY)),
        (1, make_seq("seeded", seeded, TARGET_TOKENS, SEEDED)),
        *mixed_requests(target),
    ]
    outputs, preemptions = drive(runner, arrivals, NUM_BLOCKS)
    assert outputs["target"] == expected
    assert outputs["seeded"] == expected_seeded
    # Requests with the target's prompt and greedy sampling answer it too, from cached blocks.
    for rid in ("other-5", "other-10"):
        assert outputs[rid] and outputs[rid] == expected[: len(outputs[rid])]
    # The cache is too small for all 16 at once: some were preempted and recomputed.
    assert preemptions > 0
