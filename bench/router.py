"""What the router costs on top of a worker, in one run: per-token gaps and requests/s.

    python bench/router.py [--tokens 128] [--streams 20] [--clients 32] [--seconds 3] [--rounds 3]
                           [--token-delay-ms 0] [--baseline-rev REV]

A fast fake worker (no model, no delay between tokens unless --token-delay-ms) and a router in front of it run
as real gRPC servers, each in a process of its own, so neither shares the client's event
loop or CPU time. The client sends the same load straight to the worker and through the
router, alternating between the two so machine noise hits both, and prints one table:
inter-token gaps of one stream at a time (p50/p99 and the difference router - direct) and
requests/s with many concurrent clients and short replies (ratio router / direct).

--baseline-rev REV also runs the router of git revision REV (checked out into a temporary
folder, its protos generated there) in front of the same fake worker, interleaved with the
other two, and adds its column and the ratio this tree / REV: before and after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import tempfile
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
    kind: str, worker_address: str = "", token_delay_ms: float = 0, root: Path = ROOT
) -> tuple[subprocess.Popen[str], str]:
    """Run `root`'s bench/router.py as a server (another revision's for a baseline router)."""
    proc = subprocess.Popen(
        [
            *(sys.executable, str(root / "bench" / "router.py"), "--serve", kind),
            *("--worker-address", worker_address, "--token-delay-ms", str(token_delay_ms)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        raise RuntimeError(f"the {kind} process exited with {proc.wait()} before serving")
    return proc, address


def checkout(rev: str, into: Path) -> Path:
    """The tree of `rev` in `into`, with its generated protos (they are not committed)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--baseline-rev {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    if not (into / "bench" / "router.py").exists():
        raise SystemExit(f"--baseline-rev {rev}: that revision has no bench/router.py to serve its router")
    subprocess.run([sys.executable, "scripts/gen_protos.py"], cwd=into, check=True, capture_output=True)
    return into


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


async def bench(
    args: argparse.Namespace, worker_address: str, router_address: str, baseline_address: str | None
) -> None:
    routers = {"router": router_address}
    if baseline_address is not None:
        routers["baseline"] = baseline_address
    channels = [grpc.aio.insecure_channel(a) for a in (worker_address, *routers.values())]
    try:
        senders = {"direct": direct_sender(worker_pb2_grpc.WorkerStub(channels[0]))}
        for (name, _), channel in zip(routers.items(), channels[1:], strict=True):
            senders[name] = routed_sender(router_pb2_grpc.InferenceStub(channel))
            await wait_routable(senders[name])
        for send in senders.values():  # warm every path (channels, first-call costs)
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
    finally:
        for channel in channels:
            await channel.close()

    rows: list[tuple[str, dict[str, float], str]] = [
        (f"inter-token gap p{q} (ms)", {n: pct(g, q) for n, g in gaps.items()}, ".3f") for q in (50, 99)
    ]
    rows.append(("time to first token p50 (ms)", {n: statistics.median(t) for n, t in ttfts.items()}, ".3f"))
    rows.append(("requests/s (median of rounds)", {n: statistics.median(r) for n, r in rps.items()}, ".0f"))
    baseline = "baseline" in senders
    print(
        f"\nrouter overhead: fake worker ({args.token_delay_ms:g} ms before each token); "
        f"{args.tokens}-token streams x {args.streams * args.rounds} one at a time; "
        f"{args.clients} concurrent clients x {SHORT_TOKENS}-token replies, "
        f"{args.rounds} rounds of {args.seconds:g} s; {', '.join(senders)} runs interleaved"
        + (f"; baseline = the router of {args.baseline_rev}" if baseline else "")
        + "\n"
    )
    header = f"{'metric':<34}{'direct':>10}{'router':>10}{'router-direct':>15}{'ratio':>8}"
    print(header + (f"{'baseline':>10}{'router/baseline':>17}" if baseline else ""))
    for label, v, f in rows:
        line = f"{label:<34}{v['direct']:>10{f}}{v['router']:>10{f}}"
        line += f"{v['router'] - v['direct']:>+15{f}}{v['router'] / v['direct']:>8.2f}"
        if baseline:
            line += f"{v['baseline']:>10{f}}{v['router'] / v['baseline']:>17.2f}"
        print(line)
    added = pct(gaps["router"], 50) - pct(gaps["direct"], 50)
    print(f"\ntarget: added p50 gap <= 1 ms -> {'met' if added <= 1.0 else 'NOT met'}")
    if baseline:
        before = pct(gaps["baseline"], 50) - pct(gaps["direct"], 50)
        print(
            f"added p50 gap {added:+.3f} ms against the baseline's {before:+.3f} ms ({added / before:.2f}x)"
        )


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
    parser.add_argument(
        "--baseline-rev", help="also run this git revision's router, interleaved, for a before/after"
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
    scratch = tempfile.TemporaryDirectory(prefix="bench-router-baseline-")
    try:
        worker, worker_address = _spawn("worker", token_delay_ms=args.token_delay_ms)
        procs.append(worker)
        router, router_address = _spawn("router", worker_address)
        procs.append(router)
        baseline_address = None
        if args.baseline_rev:
            old_tree = checkout(args.baseline_rev, Path(scratch.name))
            baseline, baseline_address = _spawn("router", worker_address, root=old_tree)
            procs.append(baseline)
        asyncio.run(bench(args, worker_address, router_address, baseline_address))
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
        scratch.cleanup()


if __name__ == "__main__":
    main()
