"""Worker speed on this machine: model load, single-stream decode and prefill, start-to-SERVING.

    python bench/worker_speed.py [--dtype bfloat16|float32] [--tokens 128] [--hf] [--serve]

--hf also times Hugging Face transformers' `generate` on the same weights, for comparison;
--serve starts `python -m services.worker` as a process and times it until health says SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.common.server import wait_serving  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.request import ChatTurn, GenerateRequest, SamplingParams  # noqa: E402
from services.worker.service import WorkerService  # noqa: E402

PROMPT = (ChatTurn("user", "Write a long story about a lighthouse keeper."),)


async def engine_speed(dtype: str, tokens: int, runs: int) -> None:
    started = time.perf_counter()
    service = await WorkerService.load(WorkerConfig(dtype=dtype, port=0, max_context=4096))
    print(f"load + warm-up ({dtype}): {time.perf_counter() - started:.2f} s")
    request = GenerateRequest(
        messages=PROMPT, max_tokens=tokens, sampling=SamplingParams(ignore_eos=True), request_id="bench"
    )
    rates = []
    for _ in range(runs):
        first_at = None
        count = 0
        async for delta in service.generate(request):
            count += len(delta.token_ids)
            if first_at is None:
                first_at, first_count = time.perf_counter(), count
        rates.append((count - first_count) / (time.perf_counter() - first_at))
    print(f"decode, single stream ({dtype}): median {statistics.median(rates):.1f} tok/s over {runs} runs")
    long_prompt = GenerateRequest(
        prompt_token_ids=tuple(range(1000, 3000)), max_tokens=1, request_id="prefill"
    )
    started = time.perf_counter()
    async for _ in service.generate(long_prompt):
        pass
    print(f"prefill 2000 tokens ({dtype}): {2000 / (time.perf_counter() - started):.0f} tok/s")
    await service.stop()


def hf_speed(dtype: str, tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.worker.model.loader import packaged_model_path

    gguf = packaged_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT[0].content}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    n = out.shape[1] - ids.shape[1]
    print(f"transformers generate ({dtype}): {n / (time.perf_counter() - started):.1f} tok/s")


async def start_to_serving(dtype: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INFERMESH_WORKER_PORT": str(port), "INFERMESH_WORKER_DTYPE": dtype}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.worker", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_serving(f"127.0.0.1:{port}", timeout=300)
        print(f"process start to SERVING ({dtype}): {time.perf_counter() - started:.2f} s")
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hf", action="store_true")
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()
    asyncio.run(engine_speed(args.dtype, args.tokens, args.runs))
    if args.hf:
        hf_speed(args.dtype, args.tokens)
    if args.serve:
        asyncio.run(start_to_serving(args.dtype))


if __name__ == "__main__":
    main()
