"""What the router costs on top of a worker, in one run: per-token gaps and requests/s.

    python bench/router.py [--tokens 128] [--streams 20] [--clients 32] [--seconds 3] [--rounds 3]
                           [--token-delay-ms 0]

A fast fake worker (no model, no delay between tokens unless --token-delay-ms) and a router in front of it run
as real gRPC servers, each in a process of its own, so neither shares the client's event
loop or CPU time. The client sends the same load straight to the worker and through the
router, alternating between the two so machine noise hits both, and prints one table:
inter-token gaps of one stream at a time (p50/p99 and the difference router - direct) and
requests/s with many concurrent clients and short replies (ratio router / direct).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from infermesh.common.v1 import common_pb2  # noqa: E402
from infermesh.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

MODEL = "fake-chat"
SHORT_TOKENS = 8

Send = Callable[[int], Awaitable[list[float]]]


# --- the servers, each run as `python bench/router.py --serve worker|router` -------------


async def _serve(kind: str, worker_address: str, token_delay_ms: float) -> None:
    from services.common.config import load_config
    from services.router.config import RouterConfig
    from services.router.server import create_server
    from tests.integration.router.fakes import FakeWorker, start_fake

    if kind == "worker":
        worker = FakeWorker("bench-worker", token_delay_s=token_delay_ms / 1000)
        server = await start_fake(worker)
    else:
        overrides = {"port": 0, "worker_addresses": [worker_address], "log_level": "warning"}
        config = load_config(RouterConfig, "router", env={}, overrides=overrides)
        server = await create_server(config)
        await server.start()
    print(server.address, flush=True)
    # The parent closes our stdin to stop us; nothing is left behind if it dies.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


def _spawn(
    kind: str, worker_address: str = "", token_delay_ms: float = 0
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, __file__, "--serve", kind),
            *("--worker-address", worker_address, "--token-delay-ms", str(token_delay_ms)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        raise RuntimeError(f"the {kind} process exited with {proc.wait()} before serving")
    return proc, address


# --- the client ---------------------------------------------------------------------------


def _text(tokens: int) -> str:
    # The fake worker echoes "echo: " + the message word by word: tokens - 1 words give
    # exactly `tokens` tokens.
    return " ".join(f"w{i}" for i in range(tokens - 1))


def direct_sender(stub: worker_pb2_grpc.WorkerStub) -> Send:
    async def send(tokens: int) -> list[float]:
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            model=MODEL,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=_text(tokens))],
            max_tokens=tokens,
        )
        return [time.perf_counter() async for _ in stub.Generate(request, timeout=30)]

    return send


def routed_sender(stub: router_pb2_grpc.InferenceStub) -> Send:
    async def send(tokens: int) -> list[float]:
        request = router_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            model=MODEL,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=_text(tokens))],
            max_tokens=tokens,
        )
        return [time.perf_counter() async for resp in stub.Generate(request, timeout=30) if resp.text]

    return send


async def gaps_of(send: Send, tokens: int, streams: int, ttfts: list[float]) -> list[float]:
    """Milliseconds between consecutive tokens, one stream at a time (first-token times go
    to `ttfts`)."""
    gaps: list[float] = []
    for _ in range(streams):
        started = time.perf_counter()
        arrivals = await send(tokens)
        ttfts.append((arrivals[0] - started) * 1000)
        if len(arrivals) != tokens:
            raise RuntimeError(f"expected {tokens} tokens, got {len(arrivals)}")
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return gaps


async def requests_per_s(send: Send, clients: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            if len(await send(SHORT_TOKENS)) != SHORT_TOKENS:
                raise RuntimeError("short reply came back incomplete")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def wait_routable(send: Send) -> None:
    """Until the router has the worker's load report and places a request on it."""
    deadline = time.perf_counter() + 20
    while True:
        try:
            await send(2)
            return
        except grpc.aio.AioRpcError:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.1)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def bench(args: argparse.Namespace, worker_address: str, router_address: str) -> None:
    async with (
        grpc.aio.insecure_channel(worker_address) as wch,
        grpc.aio.insecure_channel(router_address) as rch,
    ):
        senders = {
            "direct": direct_sender(worker_pb2_grpc.WorkerStub(wch)),
            "router": routed_sender(router_pb2_grpc.InferenceStub(rch)),
        }
        await wait_routable(senders["router"])
        for send in senders.values():  # warm both paths (channels, first-call costs)
            await gaps_of(send, args.tokens, 2, [])
            await requests_per_s(send, args.clients, 0.3)

        gaps: dict[str, list[float]] = {name: [] for name in senders}
        ttfts: dict[str, list[float]] = {name: [] for name in senders}
        rps: dict[str, list[float]] = {name: [] for name in senders}
        for r in range(args.rounds):
            # Alternate which goes first so a drift in machine load does not favour one.
            order = list(senders) if r % 2 == 0 else list(reversed(senders))
            for name in order:
                gaps[name] += await gaps_of(senders[name], args.tokens, args.streams, ttfts[name])
            for name in order:
                rps[name].append(await requests_per_s(senders[name], args.clients, args.seconds))

    d, rt = gaps["direct"], gaps["router"]
    print(
        f"\nrouter overhead: fake worker ({args.token_delay_ms:g} ms before each token); "
        f"{args.tokens}-token streams x {args.streams * args.rounds} one at a time; "
        f"{args.clients} concurrent clients x {SHORT_TOKENS}-token replies, "
        f"{args.rounds} rounds of {args.seconds:g} s; direct and router runs interleaved\n"
    )
    print(f"{'metric':<34}{'direct':>10}{'router':>10}{'router-direct':>15}{'ratio':>8}")
    for label, q in (("inter-token gap p50 (ms)", 50), ("inter-token gap p99 (ms)", 99)):
        a, b = pct(d, q), pct(rt, q)
        print(f"{label:<34}{a:>10.3f}{b:>10.3f}{b - a:>+15.3f}{b / a:>8.2f}")
    a, b = statistics.median(ttfts["direct"]), statistics.median(ttfts["router"])
    print(f"{'time to first token p50 (ms)':<34}{a:>10.3f}{b:>10.3f}{b - a:>+15.3f}{b / a:>8.2f}")
    a, b = statistics.median(rps["direct"]), statistics.median(rps["router"])
    print(f"{'requests/s (median of rounds)':<34}{a:>10.0f}{b:>10.0f}{b - a:>+15.0f}{b / a:>8.2f}")
    print(f"\ntarget: added p50 gap <= 1 ms -> {'met' if pct(rt, 50) - pct(d, 50) <= 1.0 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream in the gap test")
    parser.add_argument("--streams", type=int, default=20, help="streams per round in the gap test")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in the requests/s test")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one requests/s run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--token-delay-ms", type=float, default=0.0, help="pause of the fake worker before each token"
    )
    parser.add_argument("--serve", choices=["worker", "router"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-address", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.worker_address, args.token_delay_ms))
        return
    if not 2 <= args.tokens <= 200:
        parser.error("--tokens must be between 2 and 200 (the fake model's context is 512 tokens)")

    procs: list[subprocess.Popen[str]] = []
    try:
        worker, worker_address = _spawn("worker", token_delay_ms=args.token_delay_ms)
        procs.append(worker)
        router, router_address = _spawn("router", worker_address)
        procs.append(router)
        asyncio.run(bench(args, worker_address, router_address))
    finally:
        # The router first, so the worker sees its streams end rather than being cut off.
        for proc in reversed(procs):
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
