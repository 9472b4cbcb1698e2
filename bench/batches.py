"""Batch jobs and the Python client, in one run, against a router and a fake worker:

    python bench/batches.py [--requests 128] [--tokens 16] [--token-delay-ms 2] [--rounds 5] [--calls 1000]

The servers run in processes of their own (`bench/router.py --serve`). Prints two tables:

1. The same N requests three ways: as one batch job (submit, poll until done), which the
   router runs `batch_concurrency` (16) at a time; the same number at a time from an
   `AsyncClient` (hand-written concurrency, the like-for-like baseline); and one at a time with
   `Client.generate` (what a plain script does, for reference, run once). The batch job and
   the AsyncClient alternate over --rounds rounds: medians of the wall times, and the ratio
   column is the median of the per-round ratios to the AsyncClient at the same concurrency.
2. What `infermesh.client.Client` adds to a unary call over the bare generated stub
   (ListModels, p50 and p99 over --calls calls each, interleaved in rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

# The servers of bench/router.py, each in a process of its own.
from bench.router import _spawn as spawn  # noqa: E402
from infermesh.client import AsyncClient, BatchItem, Client  # noqa: E402
from infermesh.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402
from services.router.config import RouterConfig  # noqa: E402

# What the router (started with its defaults) runs of one batch job at a time; the hand-written
# baseline keeps as many requests in flight, so the two compare like with like.
CONCURRENCY = RouterConfig().batch.concurrency


def prompts(n: int, tokens: int) -> list[str]:
    return [" ".join(f"w{i}x{j}" for j in range(tokens)) for i in range(n)]


def one_at_a_time(address: str, texts: list[str], tokens: int) -> float:
    with Client(address, timeout=60) as client:
        start = time.perf_counter()
        for text in texts:
            client.generate(text, max_tokens=tokens)
        return time.perf_counter() - start


def as_batch(address: str, texts: list[str], tokens: int) -> float:
    items = [BatchItem(f"r{i}", [t], max_tokens=tokens) for i, t in enumerate(texts)]
    with Client(address, timeout=60) as client:
        start = time.perf_counter()
        job = client.submit_batch(items)
        while not job.done:
            time.sleep(0.02)
            job = client.get_batch(job.batch_id)
        elapsed = time.perf_counter() - start
        assert job.completed == len(texts), job
        return elapsed


async def concurrently(address: str, texts: list[str], tokens: int) -> float:
    async with AsyncClient(address, timeout=60) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(text: str) -> None:
            async with gate:
                await client.generate(text, max_tokens=tokens)

        start = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - start


def unary_latencies(address: str, calls: int, rounds: int = 5) -> tuple[list[float], list[float]]:
    bare: list[float] = []
    wrapped: list[float] = []
    with grpc.insecure_channel(address) as channel, Client(address, timeout=10) as client:
        stub = router_pb2_grpc.InferenceStub(channel)
        stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        client.list_models()
        for _ in range(rounds):
            for _ in range(calls // rounds):
                t = time.perf_counter()
                stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
                bare.append(time.perf_counter() - t)
            for _ in range(calls // rounds):
                t = time.perf_counter()
                client.list_models()
                wrapped.append(time.perf_counter() - t)
    return bare, wrapped


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--token-delay-ms", type=float, default=2.0, help="fake worker's pause per token")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of batch job vs AsyncClient")
    parser.add_argument("--calls", type=int, default=1000, help="unary calls per side in table 2")
    args = parser.parse_args()

    procs: list[subprocess.Popen[str]] = []
    try:
        worker, worker_address = spawn("worker", token_delay_ms=args.token_delay_ms)
        procs.append(worker)
        router, address = spawn("router", worker_address)
        procs.append(router)
        with Client(address, timeout=30) as client:
            deadline = time.monotonic() + 30
            while not any(e.healthy for e in client.cluster_status().endpoints):
                if time.monotonic() > deadline:
                    raise RuntimeError("the router never saw the worker")
                time.sleep(0.1)
        texts = prompts(args.requests, args.tokens)
        sequential = one_at_a_time(address, texts, args.tokens)
        batch: list[float] = []
        concurrent: list[float] = []
        for r in range(args.rounds):
            # Each starts every other round: neither always runs on the other's leftovers.
            for way in ("batch", "concurrent") if r % 2 == 0 else ("concurrent", "batch"):
                if way == "batch":
                    batch.append(as_batch(address, texts, args.tokens))
                else:
                    concurrent.append(asyncio.run(concurrently(address, texts, args.tokens)))
        bare, wrapped = unary_latencies(address, args.calls)
    finally:
        for proc in reversed(procs):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)

    n = args.requests
    print(
        f"\n{n} requests of {args.tokens} tokens, fake worker {args.token_delay_ms} ms/token, "
        f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
        f"router batch_concurrency {CONCURRENCY} (its default)\n"
    )
    print(f"{'way':<46}{'seconds':>9}{'requests/s':>12}{f'vs AsyncClient x{CONCURRENCY}':>20}")
    for label, runs in (
        (f"one batch job (submit + poll), {CONCURRENCY} at a time", batch),
        (f"{CONCURRENCY} at a time (AsyncClient)", concurrent),
        ("one at a time (Client.generate), reference", [sequential] * len(concurrent)),
    ):
        seconds = statistics.median(runs)
        ratio = statistics.median(c / s for c, s in zip(concurrent, runs, strict=True))
        print(f"{label:<46}{seconds:>9.2f}{n / seconds:>12.1f}{ratio:>19.2f}x")
    print(f"\nListModels, {len(bare)} calls each side")
    print(f"{'':<34}{'bare stub':>10}{'Client':>10}{'difference':>12}")
    for q in (50, 99):
        a, b = pct(bare, q) * 1e6, pct(wrapped, q) * 1e6
        print(f"{f'p{q} latency (us)':<34}{a:>10.0f}{b:>10.0f}{b - a:>+12.0f}")


if __name__ == "__main__":
    main()
