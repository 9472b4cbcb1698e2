"""Worker speed against Hugging Face transformers on the same weights, in one run.

    python bench/worker_speed.py [--dtype bfloat16|float32] [--tokens 128] [--runs 3]

Prints one table: single-stream decode, 2000-token prefill and load time for
transformers in this process (the baseline) and for the worker as its own process,
called over gRPC (the service as clients see it; in a process of its own so the two
torch thread pools don't compete). Runs alternate between the contenders so machine noise hits all of them;
the ratio column is what to read, not the absolute figures. Both are warm when measured: the
worker runs a warm-up pass before it reports SERVING, and transformers gets one decode and
one prefill of the measured sizes first, not counted (its first calls pay one-time costs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import torch  # noqa: E402

from infermesh.common.v1 import common_pb2  # noqa: E402
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from services.common.server import wait_serving  # noqa: E402
from services.worker.model.loader import packaged_model_path  # noqa: E402

QUESTION = "Write a long story about a lighthouse keeper."
PREFILL_TOKENS = 2000


def _rate_after_first(counts_at: list[tuple[float, int]]) -> float:
    """Decode tokens/s, not counting the first chunk (prefill and time to first token)."""
    (t0, n0), (t1, n1) = counts_at[0], counts_at[-1]
    return (n1 - n0) / (t1 - t0)


class HuggingFace:
    def __init__(self, dtype: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = packaged_model_path()
        started = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        self.load_s = time.perf_counter() - started
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
        )
        self.ids = self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def decode(self, tokens: int) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            self.model.generate(self.ids, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - started
            started = time.perf_counter()
            out = self.model.generate(self.ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            elapsed = time.perf_counter() - started
        # Same measure as ours: tokens after the first over the time after the first.
        return (out.shape[1] - self.ids.shape[1] - 1) / (elapsed - first)

    def warm_up(self, tokens: int) -> None:
        """What the worker does before it serves: first calls of each shape, not measured."""
        self.decode(tokens)
        self.prefill()

    def prefill(self) -> float:
        ids = torch.arange(1000, 1000 + PREFILL_TOKENS).unsqueeze(0)
        with torch.inference_mode():
            started = time.perf_counter()
            self.model(ids, logits_to_keep=1)
        return PREFILL_TOKENS / (time.perf_counter() - started)


class WorkerProcess:
    """`python -m services.worker` as its own process, called over gRPC."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    async def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        env = {**os.environ, "INFERMESH_WORKER_PORT": str(port), "INFERMESH_WORKER_DTYPE": self.dtype}
        started = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.worker", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        await wait_serving(self.address, timeout=300)
        self.start_s = time.perf_counter() - started
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def decode(self, tokens: int) -> float:
        request = worker_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=QUESTION)],
            max_tokens=tokens,
            sampling=common_pb2.SamplingParams(ignore_eos=True),
        )
        counts_at: list[tuple[float, int]] = []
        count = 0
        async for chunk in self.stub.Generate(request, timeout=600):
            count += len(chunk.token_ids)
            counts_at.append((time.perf_counter(), count))
        return _rate_after_first(counts_at)

    async def prefill(self) -> float:
        request = worker_pb2.GenerateRequest(
            prompt_token_ids=range(1000, 1000 + PREFILL_TOKENS), max_tokens=1
        )
        started = time.perf_counter()
        async for _ in self.stub.Generate(request, timeout=600):
            pass
        return PREFILL_TOKENS / (time.perf_counter() - started)

    async def stop(self) -> None:
        await self.channel.close()
        self.proc.terminate()
        await self.proc.wait()


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _row(name: str, value: float, base: float, unit: str, better: Callable[[float, float], float]) -> str:
    return f"| {name:<44} | {value:>9.1f} {unit:<5} | {better(value, base):>6.2f}x |"


async def run(dtype: str, tokens: int, runs: int) -> None:
    hf = HuggingFace(dtype)
    hf.warm_up(tokens)
    worker = WorkerProcess(dtype)
    await worker.start()
    hf_dec, grpc_dec, hf_pre, grpc_pre = [], [], [], []
    try:
        for _ in range(runs):
            hf_dec.append(hf.decode(tokens))
            grpc_dec.append(await worker.decode(tokens))
            hf_pre.append(hf.prefill())
            grpc_pre.append(await worker.prefill())
    finally:
        await worker.stop()

    faster = lambda value, base: value / base  # noqa: E731 - rates: higher is better
    quicker = lambda value, base: base / value  # noqa: E731 - times: lower is better
    print(f"\nworker speed, {dtype}, {tokens} tokens, median of {runs} interleaved runs")
    print(f"| {'measure':<44} | {'value':>15} | {'vs HF':>7} |")
    print(f"|{'-' * 46}|{'-' * 17}|{'-' * 9}|")
    base = _median(hf_dec)
    print(_row("decode 1 stream: transformers generate", base, base, "tok/s", faster))
    print(_row("decode 1 stream: infermesh worker over gRPC", _median(grpc_dec), base, "tok/s", faster))
    base = _median(hf_pre)
    print(_row(f"prefill {PREFILL_TOKENS} tokens: transformers", base, base, "tok/s", faster))
    print(
        _row(f"prefill {PREFILL_TOKENS} tokens: infermesh worker", _median(grpc_pre), base, "tok/s", faster)
    )
    print(_row("load from GGUF: transformers (in process)", hf.load_s, hf.load_s, "s", quicker))
    print(_row("process start to SERVING: infermesh worker", worker.start_s, hf.load_s, "s", quicker))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.dtype, args.tokens, args.runs))


if __name__ == "__main__":
    main()
