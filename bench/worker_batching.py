"""Continuous batching against the worker's one-request-at-a-time path, in one run.

    python bench/worker_batching.py [--dtype bfloat16|float32] [--requests 16] [--runs 3]

Workload: seeded requests, prompts of 20-120 random tokens, max_tokens 16-64,
ignore_eos, all submitted at t=0. Baseline: the same model and tokens run one
request after another (what the engine does today). Contender: the pure scheduler
and the paged-cache batch runner. Runs alternate so machine noise hits both; read
the ratio column, not the absolute figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.worker.batch_runner import BatchRunner  # noqa: E402
from services.worker.core.block_manager import BlockManager  # noqa: E402
from services.worker.core.scheduler import Scheduler, SchedulerLimits  # noqa: E402
from services.worker.model.loader import packaged_model_path  # noqa: E402
from services.worker.model.paged_kv_cache import PagedKVCache  # noqa: E402
from services.worker.request import SamplingParams  # noqa: E402
from services.worker.runner import ModelRunner  # noqa: E402
from services.worker.sequence import GenSequence  # noqa: E402
from services.worker.step import run_step, state_for  # noqa: E402

BLOCK = 16
PARAMS = SamplingParams(ignore_eos=True)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, 40000) for _ in range(rng.randint(20, 120))], rng.randint(16, 64))
        for _ in range(n)
    ]


def make_seqs(work: list[tuple[list[int], int]]) -> dict[str, GenSequence]:
    return {
        f"r{i}": GenSequence(
            request_id=f"r{i}",
            prompt_ids=prompt,
            resume_ids=[],
            sampling=PARAMS,
            seed=0,
            max_new_tokens=n,
            decode=lambda ids: "",
        )
        for i, (prompt, n) in enumerate(work)
    }


def one_at_a_time(runner: ModelRunner, work: list[tuple[list[int], int]]) -> tuple[float, int]:
    started, tokens = time.perf_counter(), 0
    for seq in make_seqs(work).values():
        tokens += len(runner.generate(seq))
    return time.perf_counter() - started, tokens


def batched(runner: ModelRunner, work: list[tuple[list[int], int]], budget: int) -> tuple[float, int]:
    num_blocks = sum(-(-(len(p) + n) // BLOCK) for p, n in work)
    scheduler = Scheduler(
        BlockManager(num_blocks, BLOCK),
        SchedulerLimits(max_num_seqs=len(work), max_num_batched_tokens=budget),
    )
    batch = BatchRunner(
        runner.model, PagedKVCache(runner.args, num_blocks, BLOCK, runner.dtype, runner.device)
    )
    seqs = make_seqs(work)
    started = time.perf_counter()
    for seq in seqs.values():
        scheduler.add(state_for(seq.request_id, seq))
    while scheduler.has_work():
        run_step(scheduler, batch, seqs)
    return time.perf_counter() - started, sum(len(s.output_ids) for s in seqs.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=256, help="tokens per batched step")
    args = parser.parse_args()
    runner, _ = ModelRunner.load(packaged_model_path(), torch.device("cpu"), getattr(torch, args.dtype), 1024)
    work = workload(args.requests)
    one_at_a_time(runner, work[:2])  # warm-up: first calls pay one-time set-up
    batched(runner, work[:2], args.budget)
    rates: dict[str, list[float]] = {"one at a time (baseline)": [], "continuous batching": []}
    for _ in range(args.runs):
        for name, fn in (
            ("one at a time (baseline)", lambda: one_at_a_time(runner, work)),
            ("continuous batching", lambda: batched(runner, work, args.budget)),
        ):
            seconds, tokens = fn()
            rates[name].append(tokens / seconds)
    base = statistics.median(rates["one at a time (baseline)"])
    print(
        f"{args.requests} requests, {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.runs} runs"
    )
    print(f"{'path':<28}{'generated tok/s':>18}{'ratio':>8}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<28}{rate:>18.1f}{rate / base:>8.2f}")


if __name__ == "__main__":
    main()
