"""What observability costs per RPC, in one run: the server interceptors with tracing off (the
default: gRPC metrics only) and on (metrics + a span per RPC, continued from the caller's
trace context), against a bare grpc.aio server.

    python bench/observability.py [--calls 200] [--stream 100] [--rounds 25]

Servers and client share one process and event loop (what is measured is the interceptors'
CPU time per call, which they add wherever they run). Variants alternate round by round so
machine noise hits them alike; the table shows microseconds per unary call and per streamed
message (median over rounds) and the ratio to the bare server measured in the same phase.
Tracing is switched on for the second phase only (a process has one tracer provider); spans
go to an exporter that drops them, so export cost is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from services.common import telemetry  # noqa: E402

SERVICE = "bench.Echo"


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield b"x"


async def _server(interceptors: list[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=interceptors)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _round(address: str, calls: int, stream: int) -> tuple[float, float]:
    """(µs per unary call, µs per streamed message) on a fresh channel, inside a root span."""
    async with grpc.aio.insecure_channel(address, interceptors=telemetry.client_interceptors()) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        streamed = channel.unary_stream(f"/{SERVICE}/Stream")
        await unary(b"warm")
        with trace.get_tracer("bench").start_as_current_span("caller"):
            started = time.perf_counter()
            for _ in range(calls):
                await unary(b"ping")
            per_call = (time.perf_counter() - started) / calls * 1e6
            started = time.perf_counter()
            for _ in range(10):
                async for _ in streamed(str(stream).encode()):
                    pass
            per_message = (time.perf_counter() - started) / (10 * stream) * 1e6
    return per_call, per_message


async def _phase(
    variants: dict[str, list[grpc.aio.ServerInterceptor]], args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    servers = {name: await _server(interceptors) for name, interceptors in variants.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, (_, address) in servers.items():
                samples[name].append(await _round(address, args.calls, args.stream))
    finally:
        for server, _ in servers.values():
            await server.stop(0)
    return {
        name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
        for name, runs in samples.items()
    }


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, float, float, float, float]] = []
    off = await _phase({"bare server": [], "tracing off (metrics)": telemetry.server_interceptors()}, args)
    base = off["bare server"]
    rows += [(name, *v, v[0] / base[0], v[1] / base[1]) for name, v in off.items()]

    telemetry.configure_tracing("bench", "", exporter=_Drop())
    on = await _phase(
        {"bare server ": [], "tracing on (metrics + spans)": telemetry.server_interceptors()}, args
    )
    base = on["bare server "]
    rows += [(name, *v, v[0] / base[0], v[1] / base[1]) for name, v in on.items()]
    telemetry.shutdown_tracing()

    print(
        f"{args.calls} unary calls and 10 streams of {args.stream} messages per round, {args.rounds} rounds"
    )
    print(f"{'variant':32} {'µs/unary call':>14} {'µs/message':>11} {'unary ratio':>12} {'stream ratio':>13}")
    for name, call, message, call_ratio, message_ratio in rows:
        print(f"{name.strip():32} {call:14.1f} {message:11.2f} {call_ratio:12.2f} {message_ratio:13.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--stream", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=25)
    asyncio.run(main(parser.parse_args()))
