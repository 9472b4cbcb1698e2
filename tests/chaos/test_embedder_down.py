"""Drill 9: the embedder dies (SIGKILL) while chat runs. Chat does not notice (>= 99% of streams
complete), Embed through the router answers UNAVAILABLE at once instead of waiting out its
deadline, and embeds work again soon after an embedder is back on the same port."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.chaos.generation_mesh import PROMPTS, Stream, generate, generation_mesh
from tests.chaos.harness import DrillResult, ServiceProcess, record, wait_until

EMBEDDER_ENV = {
    # One thread: the worker computes on the same (shared) cores.
    "INFERMESH_EMBEDDER_TORCH_THREADS": "1",
    "INFERMESH_EMBEDDER_LOG_LEVEL": "warning",
}
CHAT_LANES = 3
MAX_TOKENS = 8
CHAT_TIMEOUT_S = 60.0
EMBED_TIMEOUT_S = 10.0
# "Quickly": an Embed while the embedder is down ends this far inside its deadline.
FAIL_FAST_S = 2.0
# Embeds sent while the embedder is down, spread over this long (the router first still counts
# the dead embedder as healthy, then drops it).
OUTAGE_PROBE_S = 3.0
OUTAGE_PROBES = 12


async def embed(stub: router_pb2_grpc.InferenceStub, text: str) -> tuple[grpc.StatusCode, float]:
    """One Embed through the router: its status code and how long it took."""
    started = time.monotonic()
    try:
        response = await stub.Embed(router_pb2.EmbedRequest(inputs=[text]), timeout=EMBED_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), time.monotonic() - started
    assert len(response.embeddings) == 1 and len(response.embeddings[0].values) == 384
    return grpc.StatusCode.OK, time.monotonic() - started


async def embeds_ok(stub: router_pb2_grpc.InferenceStub) -> bool:
    code, _ = await embed(stub, "is the embedder back?")
    return code == grpc.StatusCode.OK


async def chat_until(stub: router_pb2_grpc.InferenceStub, stop: asyncio.Event, lane: int) -> list[Stream]:
    """Short chats one after another until `stop` is set."""
    streams: list[Stream] = []
    while not stop.is_set():
        prompt = PROMPTS[(lane + CHAT_LANES * len(streams)) % len(PROMPTS)]
        streams.append(await generate(stub, prompt, max_tokens=MAX_TOKENS, timeout_s=CHAT_TIMEOUT_S))
    return streams


async def test_embedder_down_leaves_chat_alone_and_embed_fails_fast(log_dir: Path) -> None:
    embedder = ServiceProcess("embedder", EMBEDDER_ENV, log_dir)
    restarted = ServiceProcess("embedder", EMBEDDER_ENV, log_dir, port=embedder.port)
    # Loads while the worker does.
    embedder.start()
    try:
        async with generation_mesh(log_dir, workers=1, embedder_addresses=embedder.address) as mesh:
            await embedder.wait_serving(120)
            await wait_until(lambda: embeds_ok(mesh.stub), 30)
            stop = asyncio.Event()
            lanes = [asyncio.create_task(chat_until(mesh.stub, stop, lane)) for lane in range(CHAT_LANES)]
            await asyncio.sleep(1.0)  # chat under way before the fault

            embedder.stop(signal.SIGKILL)
            down: list[tuple[grpc.StatusCode, float]] = []
            for i in range(OUTAGE_PROBES):
                down.append(await embed(mesh.stub, f"sent while the embedder is down, {i}"))
                await asyncio.sleep(OUTAGE_PROBE_S / OUTAGE_PROBES)

            restarted.start()
            await restarted.wait_serving(120)
            recovery_s = await wait_until(lambda: embeds_ok(mesh.stub), 30)
            await asyncio.sleep(0.5)  # chat goes on a little with the embedder back
            stop.set()
            streams = [s for lane in await asyncio.gather(*lanes) for s in lane]
    finally:
        embedder.stop()
        restarted.stop()

    chats_ok = sum(s.ok for s in streams)
    unavailable = [took for code, took in down if code == grpc.StatusCode.UNAVAILABLE]
    result = record(
        DrillResult(
            drill="9 embedder down",
            load=f"{CHAT_LANES} chat lanes + {OUTAGE_PROBES} embeds",
            injected="SIGKILL the embedder, restart on its port",
            # The chats; the embeds sent while it was down are in the note.
            total=len(streams),
            completed=chats_ok,
            failed=len(streams) - chats_ok,
            recovery_s=recovery_s,
            note=(
                f"embeds while down: {len(unavailable)}/{len(down)} UNAVAILABLE, "
                f"slowest {max(took for _, took in down):.2f}s"
            ),
        )
    )
    result.passed = (
        chats_ok >= 0.99 * len(streams) and len(unavailable) == len(down) and max(unavailable) < FAIL_FAST_S
    )
    assert streams and chats_ok >= 0.99 * len(streams), [s.details for s in streams if not s.ok]
    assert [code for code, _ in down] == [grpc.StatusCode.UNAVAILABLE] * len(down)
    assert max(took for _, took in down) < FAIL_FAST_S
