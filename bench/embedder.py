"""Embedder throughput against sentence-transformers on the same weights, in one run.

    python bench/embedder.py [--callers 256] [--rounds 5]

Prints one table: sentences/s of sentence-transformers encoding in this process with
batch 64 (the baseline, in float32 and under bfloat16 autocast), of the embedder as its
own process with `--callers` concurrent gRPC callers each sending one short sentence, and
of the same service with batching disabled (max_batch_tokens=1: every encode call takes one input).
Rounds alternate between the contenders so machine noise hits all of them; read the
ratio columns (each the median of the ratios within a round), not the absolute figures,
and the load average printed with them. Latencies are per call, over all rounds; the
batch-size histogram is what the service logs when it stops. CPU ms/sent is the CPU
time spent per sentence (for the services: the service process plus this one, the
gRPC clients), a figure that moves less with the machine's load than sentences/s.

The services compute in their default dtype, `auto`: bfloat16 where the device does it in
hardware, float32 elsewhere (`--set dtype=float32` forces float32). Like is compared with
like: the "vs ST" column divides by the in-process row in the services' dtype (float32, or
bfloat16 autocast as the service computes); the other in-process row is there for reference
(float32 is what sentence-transformers does by default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The service sets this before torch loads (services/embedder/__main__.py); the in-process
# baseline gets the same, so the ratios measure batching and gRPC, not OpenMP's wait policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402
from services.common.server import wait_serving  # noqa: E402
from services.embedder.model import packaged_model_path  # noqa: E402

WORDS = "apple river quantum violin glacier harbor pepper orbit canyon lantern meadow cipher".split()
BASELINE_BATCH = 64
# The in-process baseline, by the dtype it computes in (the services' dtype picks one).
BASELINES = {
    "float32": "sentence-transformers in process, batch 64, float32",
    "bfloat16": "sentence-transformers in process, batch 64, bf16 autocast",
}


def sentences(count: int, round_no: int, tag: str) -> list[str]:
    """Short, distinct sentences (a result cache must not help any contender)."""
    return [
        f"The {WORDS[i % 12]} by the {WORDS[(i * 7 + round_no) % 12]} is no. {i} of {tag}, round {round_no}."
        for i in range(count)
    ]


class Service:
    """`python -m services.embedder` as its own process, so the two torch thread pools don't compete."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.latencies: list[float] = []
        # CPU milliseconds per sentence, per round.
        self.cpu_ms: list[float] = []

    async def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        env = {**os.environ, **self.env, "INFERMESH_EMBEDDER_PORT": str(port)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.embedder", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        await wait_serving(self.address, timeout=300)
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)

    async def _call(self, text: str) -> None:
        started = time.perf_counter()
        response = await self.stub.Embed(embedder_pb2.EmbedRequest(inputs=[text]), timeout=600)
        self.latencies.append(time.perf_counter() - started)
        assert len(response.embeddings) == 1

    async def run(self, texts: list[str]) -> float:
        cpu = process_cpu_s(self.proc.pid) + time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(self._call(t) for t in texts))
        rate = len(texts) / (time.perf_counter() - started)
        # The service's CPU and this process's (the gRPC clients) together.
        self.cpu_ms.append((process_cpu_s(self.proc.pid) + time.process_time() - cpu) * 1000 / len(texts))
        return rate

    async def stop(self) -> dict[int, int]:
        """Stop the service; return its batch-size histogram (from its last log lines)."""
        await self.channel.close()
        self.proc.terminate()
        assert self.proc.stderr is not None
        histogram: dict[int, int] = {}
        async for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "batch_sizes" in record:
                histogram = {int(k): v for k, v in record["batch_sizes"].items()}
        await self.proc.wait()
        return histogram


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def histogram_text(histogram: dict[int, int]) -> str:
    """Batches per size bucket (powers of two), e.g. '1:3 2-3:10 4-7:40'."""
    buckets: collections.Counter[int] = collections.Counter()
    for size, count in histogram.items():
        buckets[size.bit_length() - 1] += count
    parts = []
    for b in sorted(buckets):
        low, high = 1 << b, (1 << (b + 1)) - 1
        parts.append(f"{low}:{buckets[b]}" if low == high else f"{low}-{high}:{buckets[b]}")
    return " ".join(parts) or "-"


async def run(callers: int, rounds: int, settings: dict[str, str]) -> None:
    st = SentenceTransformer(str(packaged_model_path()), device="cpu", local_files_only=True)
    # No health checks while a service waits for its turn: the histogram shows the bench's batches only.
    env = {"INFERMESH_EMBEDDER_HEALTH_INTERVAL_S": "3600"}
    env |= {f"INFERMESH_EMBEDDER_{k.upper()}": v for k, v in settings.items()}
    batched = Service("embedder over gRPC, dynamic batching", env)
    unbatched = Service(
        "embedder over gRPC, batching disabled", {**env, "INFERMESH_EMBEDDER_MAX_BATCH_TOKENS": "1"}
    )
    await batched.start()
    await unbatched.start()
    info = await batched.stub.GetInfo(embedder_pb2.GetInfoRequest(), timeout=10)
    service_dtype = info.device.dtype
    if service_dtype not in BASELINES:
        raise SystemExit(f"services compute in {service_dtype}: no in-process baseline in that dtype")
    baseline = BASELINES[service_dtype]
    rates: dict[str, list[float]] = {
        **{b: [] for b in BASELINES.values()},
        batched.name: [],
        unbatched.name: [],
    }
    in_process_cpu_ms: dict[str, list[float]] = {b: [] for b in BASELINES.values()}

    def in_process(name: str) -> Callable[[list[str]], Awaitable[float]]:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == BASELINES["bfloat16"])

        async def encode(texts: list[str]) -> float:
            cpu, started = time.process_time(), time.perf_counter()
            with autocast:
                st.encode(texts, batch_size=BASELINE_BATCH)
            in_process_cpu_ms[name].append((time.process_time() - cpu) * 1000 / len(texts))
            return len(texts) / (time.perf_counter() - started)

        return encode

    contenders = {
        **{b: in_process(b) for b in BASELINES.values()},
        batched.name: batched.run,
        unbatched.name: unbatched.run,
    }
    load_before = os.getloadavg()[0]
    try:
        # Warm-up round, not counted: first calls pay for lazy initialisation everywhere.
        for name, run_round in contenders.items():
            await run_round(sentences(callers, -1, name))
        for samples in in_process_cpu_ms.values():
            samples.clear()
        for service in (batched, unbatched):
            service.latencies.clear()
            service.cpu_ms.clear()
        names = list(contenders)
        for r in range(rounds):
            # Each round starts with another contender: none always follows the same one.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(await contenders[name](sentences(callers, r, name)))
    finally:
        histograms = {batched.name: await batched.stop(), unbatched.name: await unbatched.stop()}

    def ratio(name: str, against: str) -> float:
        """Median over rounds of the ratio within each round (they ran seconds apart)."""
        return statistics.median(a / b for a, b in zip(rates[name], rates[against], strict=True))

    print(
        f"\nembedder throughput, {callers} concurrent callers x 1 short sentence, {rounds} rounds "
        f"(ratios: median of the per-round ratios; load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"services compute in {service_dtype}; 'vs ST' divides by the in-process row in {service_dtype}: "
        f"{ratio(batched.name, baseline):.2f}x with dynamic batching"
    )
    if settings:
        print("service settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    header = (
        f"| {'contender':<58} | {'sent/s':>8} | {'vs ST':>6} | {'vs unbatched':>12} "
        f"| {'CPU ms/sent':>11} | {'p50 ms':>7} | {'p99 ms':>7} | batch sizes (size:batches)"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|" + "-" * 28)
    for name in BASELINES.values():
        print(
            f"| {name:<58} | {statistics.median(rates[name]):>8.1f} | {ratio(name, baseline):>5.2f}x "
            f"| {ratio(name, unbatched.name):>11.2f}x | {statistics.median(in_process_cpu_ms[name]):>11.2f} "
            f"| {'-':>7} | {'-':>7} | 64 (fixed)"
        )
    for service in (batched, unbatched):
        p50, p99 = (percentile(service.latencies, q) * 1000 for q in (0.5, 0.99))
        print(
            f"| {service.name:<58} | {statistics.median(rates[service.name]):>8.1f} "
            f"| {ratio(service.name, baseline):>5.2f}x | {ratio(service.name, unbatched.name):>11.2f}x "
            f"| {statistics.median(service.cpu_ms):>11.2f} | {p50:>7.1f} | {p99:>7.1f} "
            f"| {histogram_text(histograms[service.name])}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="embedder config for both services"
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    asyncio.run(run(args.callers, args.rounds, settings))


if __name__ == "__main__":
    main()
