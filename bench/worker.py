"""The worker engine against Hugging Face transformers on the same weights, in one run.

    python bench/worker.py [--dtype auto] [--weights auto] [--threads 0] [--requests 64] [--skip-hf]

Workload "mixed-64": 64 chat requests (seeded), prompts of 20-300 tokens, max_tokens drawn
from 16-256, ignore_eos, all submitted at t=0. Baseline: transformers `generate` with
static batches of 16 in arrival order (left-padded; a batch runs until its longest
request is done, which is how a static batcher serves), same threads, in whichever of
float32 and bfloat16 it runs faster on this machine (timed first, printed): the engine
chooses its kernels by measurement, so the baseline gets its best dtype too.

Each contender runs in a process of its own (no shared thread pools, and its own peak
RSS). Printed: generated tokens/s on mixed-64 and the ratio to the baseline, decode tokens/s
at 1/8/32/64/128 concurrent streams beside the engine's own bare batched forward pass at
that batch (same kernels, no attention reads: what the engine would do if stepping cost
nothing but the model), single-stream decode against transformers batch 1, time to first
token of a second conversation turn (~1,000 tokens) with and without the prefix cache, and
peak RSS. Read the ratios; absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from services.worker.model.loader import packaged_model_path  # noqa: E402
from services.worker.request import ChatTurn  # noqa: E402
from services.worker.tokenizer import Tokenizer  # noqa: E402

TOKENIZER = Tokenizer.load(packaged_model_path(), ROOT / ".cache" / "worker", eos_token_ids=(2,))
STATIC_BATCH = 16
DECODE_TOKENS = 128
LEVELS = (1, 8, 32, 64, 128)
LEVEL_MAX_TOKENS = 64
# Seats in the engine: the largest level runs as one batch.
MAX_RUNNING = 128
KV_CACHE_MB = 4096
CORPUS = (
    "The lighthouse keeper climbed the spiral stairs every evening to light the lamp. Ships passed "
    "in the night, their crews grateful for the steady beam that marked the rocks. In winter the "
    "storms came from the north and the sea rose over the harbour wall, and the village gathered in "
    "the tavern to tell stories of wrecks and rescues, of captains who had sailed to the far islands "
    "and merchants who had traded spices, silk and silver along the coast for a hundred years. "
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def workload(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) of n chat requests; prompts 20-300 tokens, max_tokens 16-256."""
    rng = random.Random(seed)
    words = (CORPUS * 20).split()
    empty = len(tokenizer.encode_chat([ChatTurn("user", "")]))
    work = []
    for _ in range(n):
        target = rng.randint(20, 300)
        start = rng.randrange(len(words) // 2)
        text = " ".join(words[start : start + max(1, target - empty)])
        ids = tokenizer.encode_chat([ChatTurn("user", text)])
        while len(ids) > target and len(text.split()) > 1:
            text = " ".join(text.split()[:-1])
            ids = tokenizer.encode_chat([ChatTurn("user", text)])
        work.append((ids, rng.randint(16, 256)))
    return work


def conversation(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """A first turn of ~1,000 tokens (question and answer) and the second turn's prompt that extends it."""
    words = (CORPUS * 40).split()
    first = [ChatTurn("user", " ".join(words[:420])), ChatTurn("assistant", " ".join(words[420:760]))]
    second = [*first, ChatTurn("user", "Summarise the story in one sentence.")]
    return tokenizer.encode_chat(first), tokenizer.encode_chat(second)


# --- our engine -------------------------------------------------------------------------------


def make_engine(
    dtype: str, weights: str, *, max_running: int = MAX_RUNNING, prefix_caching: bool = True
) -> Any:
    """The engine as the worker service builds it: model loaded on the engine's own model thread.

    Loading on another thread would give torch a second OpenMP team; with more OpenMP threads
    than cores every forward pass slows down (see `model_thread`).
    """
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine, model_thread
    from services.worker.service import _load_model, build_batching

    config = WorkerConfig(
        dtype=dtype,
        weights=weights,
        max_context=2048,
        max_running=max_running,
        prefix_caching=prefix_caching,
        max_waiting=1024,
        # Room for the largest level in one batch: 128 streams of up to ~360 positions in float32
        # would overflow the default 1 GiB and run by preemption instead.
        kv_cache_mb=KV_CACHE_MB,
    )
    executor = model_thread()

    def load() -> Any:
        runner, _, _ = _load_model(config)
        return runner, build_batching(config, runner)

    runner, batching = executor.submit(load).result()
    return runner, Engine(*batching, executor=executor)


def new_seq(ids: list[int], max_tokens: int, request_id: str) -> Any:
    """A request as the worker's service builds it; real detokenising, as serving pays for it."""
    from services.worker.request import SamplingParams
    from services.worker.sequence import GenSequence

    return GenSequence(
        request_id=request_id,
        prompt_ids=ids,
        resume_ids=(),
        sampling=SamplingParams(ignore_eos=True),
        seed=0,
        max_new_tokens=max_tokens,
        decode=TOKENIZER.decode,
    )


async def run_all(engine: Any, work: list[tuple[list[int], int]]) -> tuple[int, float, list[float]]:
    """Submit every request at once; (generated tokens, seconds, time to first token of each)."""
    started = time.perf_counter()
    firsts: list[float] = []

    async def one(i: int, ids: list[int], max_tokens: int) -> int:
        n = 0
        async for delta in engine.submit(new_seq(ids, max_tokens, f"r{i}")).deltas():
            if n == 0:
                firsts.append(time.perf_counter() - started)
            n += len(delta.token_ids)
        return n

    counts = await asyncio.gather(*(one(i, ids, m) for i, (ids, m) in enumerate(work)))
    return sum(counts), time.perf_counter() - started, firsts


async def decode_rate(engine: Any, ids: list[int]) -> float:
    """Single-stream tokens/s after the first token (the prefill is not decode)."""
    times = []
    async for _ in engine.submit(new_seq(ids, DECODE_TOKENS, "decode")).deltas():
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


async def concurrent_decode(engine: Any, work: list[tuple[list[int], int]]) -> float:
    """Decode tokens/s of len(work) streams running together: tokens sampled between the moment
    the last stream got its first token (every prefill done) and the moment the first one ended."""
    stamps: list[list[float]] = [[] for _ in work]

    async def one(i: int, ids: list[int], max_tokens: int) -> None:
        async for delta in engine.submit(new_seq(ids, max_tokens, f"c{i}")).deltas():
            stamps[i] += [time.perf_counter()] * len(delta.token_ids)

    await asyncio.gather(*(one(i, ids, m) for i, (ids, m) in enumerate(work)))
    begin = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    tokens = sum(sum(1 for t in s if begin < t <= end) for s in stamps)
    return tokens / (end - begin)


def bare_forward_rate(runner: Any, rows: int, repeats: int = 3) -> float:
    """The model alone on `rows` decode tokens, every layer and the vocabulary projection, with
    the kernel the engine's plan runs at that batch and no attention reads: tokens/s."""
    from services.worker.model.kernel_bench import NoAttention

    model = runner.model
    kernel = runner.plan.kernel_for(rows)
    with torch.inference_mode():
        dtype = model.embed_tokens.weight.dtype
        x = torch.randn(1, rows, model.args.hidden_size, dtype=dtype)
        ctx = NoAttention(*model.rope(torch.arange(rows).unsqueeze(0), dtype), kernel)
        best = float("inf")
        for _ in range(repeats + 1):
            started = time.perf_counter()
            model.compute_logits(model.run_layers(x, ctx)[0]).argmax(-1)
            best = min(best, time.perf_counter() - started)
    return rows / best


async def ttft(engine: Any, ids: list[int]) -> float:
    started = time.perf_counter()
    async for _ in engine.submit(new_seq(ids, 1, "ttft")).deltas():
        pass
    return time.perf_counter() - started


async def ours(args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    work = workload(tokenizer, args.requests)
    runner, engine = make_engine(args.dtype, args.weights)
    engine.start()
    await run_all(engine, [(ids, 4) for ids, _ in work[:4]])  # warm-up
    tokens, seconds, firsts = await run_all(engine, work)
    result: dict[str, Any] = {
        "kernels": runner.plan.describe(),
        "mixed_tok_s": tokens / seconds,
        "mixed_tokens": tokens,
        "mixed_s": seconds,
        "ttft_p50_s": statistics.median(firsts),
        "levels": {},
        "bare": {},
    }
    for level in args.levels:
        shifted = workload(tokenizer, level, seed=level)  # new prompts: no prefix-cache help
        result["levels"][level] = await concurrent_decode(
            engine, [(ids, LEVEL_MAX_TOKENS) for ids, _ in shifted]
        )
        # On the model thread, as the engine runs it (one OpenMP team).
        result["bare"][level] = engine._executor.submit(bare_forward_rate, runner, level).result()
    result["decode_tok_s"] = await decode_rate(engine, work[0][0])
    first, second = conversation(tokenizer)
    result["conversation_tokens"] = len(second)
    await ttft(engine, first)  # the first turn: its blocks stay cached
    result["ttft_cached_s"] = await ttft(engine, second)
    await engine.stop()
    # Before a second model comes in for the cold run: the worker as it serves.
    result["peak_rss_mb"] = rss_mb()
    result["kv_cache_mb"] = engine.scheduler.blocks.num_blocks * kv_block_mb(runner)
    _, cold = make_engine(args.dtype, args.weights, prefix_caching=False)
    cold.start()
    await ttft(cold, first[:8])  # warm-up
    result["ttft_uncached_s"] = await ttft(cold, second)
    await cold.stop()
    return result


def kv_block_mb(runner: Any) -> float:
    from services.worker.config import WorkerConfig
    from services.worker.model.paged_kv_cache import PagedKVCache

    size = WorkerConfig().kv_block_size
    return PagedKVCache.block_bytes(runner.args, size, runner.cache_dtype) / 2**20


# --- transformers -----------------------------------------------------------------------------


def hf_fastest_dtype(tokenizer: Tokenizer) -> str:
    """float32 or bfloat16, whichever runs transformers' static batch of 16 faster here."""
    from tests.fixtures.reference_model import load_reference

    work = workload(tokenizer, STATIC_BATCH, seed=7)
    pad = tokenizer.eos_token_ids[0]
    seconds = {}
    for dtype in ("float32", "bfloat16"):
        model = load_reference(packaged_model_path(), getattr(torch, dtype))
        with torch.inference_mode():
            static_batch(model, [(ids, 4) for ids, _ in work[:2]], pad)  # warm-up
            started = time.perf_counter()
            static_batch(model, [(ids, 8) for ids, _ in work], pad)
            seconds[dtype] = time.perf_counter() - started
        del model
    return min(seconds, key=seconds.__getitem__)


def static_batch(model: Any, batch: list[tuple[list[int], int]], pad: int) -> None:
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in batch])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
    new = max(m for _, m in batch)
    # min_new_tokens: runs to the end like ignore_eos does on our side.
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
    )


def hf(args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    from tests.fixtures.reference_model import load_reference

    dtype = args.dtype if args.dtype != "auto" else hf_fastest_dtype(tokenizer)
    model = load_reference(packaged_model_path(), getattr(torch, dtype))
    work = workload(tokenizer, args.requests)
    pad = tokenizer.eos_token_ids[0]

    with torch.inference_mode():
        static_batch(model, [(ids, 4) for ids, _ in work[:2]], pad)  # warm-up
        started = time.perf_counter()
        for i in range(0, len(work), STATIC_BATCH):
            static_batch(model, work[i : i + STATIC_BATCH], pad)
        seconds = time.perf_counter() - started
        # Useful tokens only: what a static batch generates past a request's max_tokens is thrown away.
        useful = sum(m for _, m in work)
        ids = torch.tensor([work[0][0]])
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        first = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(
            ids, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False, pad_token_id=pad
        )
        decode = (DECODE_TOKENS - 1) / (time.perf_counter() - started - first)
    return {
        "dtype": dtype,
        "mixed_tok_s": useful / seconds,
        "mixed_s": seconds,
        "decode_tok_s": decode,
        "peak_rss_mb": rss_mb(),
    }


# --- driver -----------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = asyncio.run(ours(args, TOKENIZER)) if args.role == "ours" else hf(args, TOKENIZER)
    print("RESULT " + json.dumps(result))


def run_child(role: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--role", role, "--dtype", args.dtype, "--threads", str(args.threads)]
    cmd += ["--requests", str(args.requests), "--weights", args.weights]
    cmd += ["--levels", ",".join(map(str, args.levels))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise SystemExit(f"{role} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--weights", default="auto", choices=("auto", "dense", "int4", "int8"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both; 0: torch's default")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--levels",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=LEVELS,
        help="concurrent decode levels, comma-separated",
    )
    parser.add_argument("--skip-hf", action="store_true", help="only our engine (no ratios)")
    parser.add_argument("--role", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return child(args)
    base = None if args.skip_hf else run_child("hf", args)
    mine = run_child("ours", args)
    threads = args.threads or torch.get_num_threads()
    print(f"mixed-{args.requests}, {threads} threads; infermesh kernels: {mine['kernels']}")
    if base is not None:
        print(f"baseline: transformers static batches of 16 (batch 1 for single stream), {base['dtype']}")
    print(f"{'measure':<44}{'infermesh':>12}{'baseline':>12}{'ratio':>8}")

    def row(name: str, value: float, baseline: float | None = None, fmt: str = ".1f") -> None:
        ratio = f"{value / baseline:>8.2f}" if baseline else f"{'':>8}"
        shown = f"{baseline:>12{fmt}}" if baseline is not None else f"{'':>12}"
        print(f"{name:<44}{value:>12{fmt}}{shown}{ratio}")

    row("mixed: generated tok/s", mine["mixed_tok_s"], base and base["mixed_tok_s"])
    row("mixed: wall s", mine["mixed_s"], base and base["mixed_s"])
    row("mixed: time to first token p50 s", mine["ttft_p50_s"], fmt=".2f")
    print(f"{'  (next rows: baseline column is the bare batched forward at that batch)':<44}")
    for level, rate in mine["levels"].items():
        row(f"{level} concurrent decode tok/s", rate, mine["bare"][level])
    row("single-stream decode tok/s", mine["decode_tok_s"], base and base["decode_tok_s"])
    row(
        f"second turn TTFT s ({mine['conversation_tokens']} tok), cached",
        mine["ttft_cached_s"],
        mine["ttft_uncached_s"],
        fmt=".3f",
    )
    print(f"{'  (baseline column: same turn without prefix cache)':<44}")
    row("peak RSS MB", mine["peak_rss_mb"], base and base["peak_rss_mb"], fmt=".0f")
    beyond = mine["peak_rss_mb"] - mine["kv_cache_mb"]
    name = f"peak RSS beyond the {mine['kv_cache_mb']:.0f} MB KV cache"
    row(name, beyond, base and base["peak_rss_mb"], fmt=".0f")


if __name__ == "__main__":
    main()
