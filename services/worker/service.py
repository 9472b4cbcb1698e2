"""The worker's behaviour behind the RPCs: validate, tokenize, queue on the engine, report load.

Plain values in and out; `convert.py` and `servicer.py` put protobuf around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.config import ConfigError
from services.common.device import DeviceStats, device_stats, resolve_device, torch_dtype
from services.common.errors import Unavailable
from services.common.model_card import ModelCard
from services.common.serving import ServingSignal
from services.common.telemetry import Phases
from services.worker.batch_runner import BatchRunner
from services.worker.config import URGENT_PRIORITIES, WorkerConfig
from services.worker.core.block_manager import BlockManager
from services.worker.core.scheduler import Scheduler, SchedulerLimits
from services.worker.engine import Engine, EngineLoad, model_thread
from services.worker.health import HealthProbe
from services.worker.model import paged_attention_cpu
from services.worker.model.kernel_bench import candidates
from services.worker.model.loader import LoadedWeights, packaged_model_path
from services.worker.model.paged_kv_cache import PagedKVCache
from services.worker.request import (
    ChatTurn,
    GenerateRequest,
    Limits,
    SamplingParams,
    check_model,
    check_prompt_source,
    plan_tokens,
    validate_request,
)
from services.worker.runner import KernelChoice, ModelRunner
from services.worker.sequence import Delta, GenSequence
from services.worker.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
    endpoint_id: str
    at: float
    models: tuple[ModelCard, ...]
    device: DeviceStats
    engine: EngineLoad


class WorkerService:
    def __init__(
        self,
        config: WorkerConfig,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        source: str,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        args = runner.args
        self.card = ModelCard(config.model_id, "chat", runner.max_context, args.family, config.tier, source)
        self.limits = Limits(
            model_id=config.model_id,
            vocab_size=args.vocab_size,
            context_length=runner.max_context,
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_strings=config.max_stop_strings,
        )
        self.endpoint_id = config.endpoint_id or f"{socket.gethostname()}:{config.port}"
        # SERVING (True) or NOT_SERVING (False), for every server built around this service.
        self.serving = ServingSignal()
        self.engine = Engine(
            *build_batching(config, runner), on_crash=self._engine_crashed, executor=executor
        )
        self.health = HealthProbe(
            self.engine,
            self._probe_seq,
            self._report_health,
            interval_s=config.health_interval_s,
            timeout_s=config.health_timeout_s,
        )
        self._closing = asyncio.Event()

    @classmethod
    async def load(cls, config: WorkerConfig) -> WorkerService:
        """Load model and tokenizer on the model thread, start the engine and warm it up."""
        executor = model_thread()
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(executor, _load_model, config)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        service = cls(config, *loaded, executor=executor)
        try:
            return await service.start()
        except BaseException:
            await service.stop()
            raise

    async def start(self) -> WorkerService:
        self.engine.start()
        started = time.perf_counter()
        # A token through the whole engine path: SERVING must mean a request can really be served.
        warmup = GenerateRequest(request_id="warmup", prompt_token_ids=(0,), max_tokens=1)
        async for _ in self.generate(warmup):
            pass
        # The first pass is slow (lazy set-up): placement must not take it for this worker's speed.
        self.engine.forget_speed()
        logger.info("engine warmed up", extra={"seconds": round(time.perf_counter() - started, 2)})
        self.health.start()
        return self

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta]:
        if self.engine.draining:
            raise Unavailable("worker is draining: send the request to another worker")
        validate_request(req, self.limits)
        prompt_ids = await self._prompt_ids(req.messages, req.prompt, req.prompt_token_ids)
        max_new = plan_tokens(req, len(prompt_ids), self.limits)
        sampling = req.sampling
        seq = GenSequence(
            request_id=req.request_id,
            prompt_ids=prompt_ids,
            resume_ids=req.resume_token_ids,
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else random.getrandbits(64),
            max_new_tokens=max_new,
            decode=self.tokenizer.decode,
            eos_ids=self.tokenizer.eos_token_ids,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            priority=req.priority,
        )
        handle = self.engine.submit(seq)
        phases = Phases("worker prefill", "worker decode")
        try:
            async for delta in handle.deltas():
                phases.next()  # the first token ends the prefill
                if delta.finish is not None:
                    phases.end()  # now: the caller may not ask past the last delta
                yield delta
        finally:
            phases.end()

    async def tokenize(self, model: str, messages: Sequence[ChatTurn], prompt: str | None) -> list[int]:
        check_model(model, self.limits)
        check_prompt_source(messages, prompt)
        return await self._prompt_ids(messages, prompt, ())

    async def _prompt_ids(
        self, messages: Sequence[ChatTurn], prompt: str | None, token_ids: Sequence[int]
    ) -> list[int]:
        if token_ids:
            return list(token_ids)
        # Long prompts take milliseconds to tokenize: keep them off the event loop.
        if messages:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        return await asyncio.to_thread(self.tokenizer.encode, prompt or "")

    def device(self) -> DeviceStats:
        # The kernels the worker chose (e.g. "int4-bf16 <=8, fp32 above"), where clients see a dtype.
        return device_stats(self.runner.device, self.runner.plan.describe())

    def load_report(self) -> LoadSnapshot:
        return LoadSnapshot(self.endpoint_id, time.time(), (self.card,), self.device(), self.engine.load())

    async def drain(self) -> None:
        """Refuse new work and say so to health checks; in-flight requests go on."""
        self.engine.drain()
        await self.serving.publish(False)

    async def drain_and_wait(self) -> None:
        """Shutdown: let in-flight work finish, then end the load streams so they do not hold the server."""
        self.engine.drain()
        await self.engine.wait_idle()
        self._closing.set()

    async def stop(self) -> None:
        self._closing.set()
        await self.health.stop()
        await self.engine.stop()

    async def wait_closing(self, timeout: float) -> bool:
        """Sleep up to `timeout`; True when the service is shutting down."""
        try:
            await asyncio.wait_for(self._closing.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _probe_seq(self) -> GenSequence:
        return GenSequence(
            request_id="health-probe",
            prompt_ids=(0,),
            resume_ids=(),
            sampling=SamplingParams(),
            seed=0,
            max_new_tokens=1,
            decode=self.tokenizer.decode,
            eos_ids=self.tokenizer.eos_token_ids,
        )

    async def _report_health(self, serving: bool) -> None:
        await self.serving.publish(serving)

    def _engine_crashed(self, exc: BaseException) -> None:
        # A dead engine can serve nothing: say so to health checks at once.
        self.serving.publish_soon(False)


def build_batching(config: WorkerConfig, runner: ModelRunner) -> tuple[BatchRunner, Scheduler]:
    """The paged KV cache sized from config, and the scheduler that hands out its blocks."""
    block_bytes = PagedKVCache.block_bytes(runner.args, config.kv_block_size, runner.cache_dtype)
    num_blocks = config.kv_cache_mb * 2**20 // block_bytes
    # A sequence must fit the cache at full context, or long requests could never run.
    needed = -(-runner.max_context // config.kv_block_size)
    if num_blocks < needed:
        raise ConfigError(
            f"worker.kv_cache_mb={config.kv_cache_mb}: holds {num_blocks} blocks of "
            f"{config.kv_block_size} positions; one sequence at max_context={runner.max_context} needs "
            f"{needed} ({needed * block_bytes / 2**20:.0f} MB)"
        )
    cache = PagedKVCache(runner.args, num_blocks, config.kv_block_size, runner.cache_dtype, runner.device)
    blocks = BlockManager(num_blocks, config.kv_block_size, enable_prefix_caching=config.prefix_caching)
    limits = SchedulerLimits(
        max_num_seqs=config.max_running,
        max_num_batched_tokens=config.max_batch_tokens,
        max_waiting=config.max_waiting,
        max_prefill_chunk=config.prefill_chunk_tokens,
        urgent_priority=URGENT_PRIORITIES[config.urgent_priority],
        max_urgent_steps=config.max_urgent_steps,
    )
    logger.info(
        "KV cache ready",
        extra={
            "blocks": num_blocks,
            "block_size": config.kv_block_size,
            "mb": cache.nbytes // 2**20,
            "dtype": str(runner.cache_dtype).removeprefix("torch."),
        },
    )
    return BatchRunner(runner.model, cache, runner.plan), Scheduler(blocks, limits)


def kernel_choice(
    config: WorkerConfig, device: torch.device, weights: LoadedWeights, cache_dir: Path
) -> KernelChoice:
    """The kernels this worker may run, for the plan it measures at start."""
    shipped = "int4" if weights.q4 else None
    try:
        kernels = candidates(device, config.dtype, config.weights, shipped)
    except ValueError as exc:
        raise ConfigError(f"worker.{exc}") from exc
    return KernelChoice(
        tuple(kernels),
        max_rows=config.max_batch_tokens,
        max_sampled_rows=config.max_running,
        cache_dir=cache_dir / "kernels",
        quantize=config.weights in ("int4", "int8"),
    )


def _load_model(config: WorkerConfig) -> tuple[ModelRunner, Tokenizer, str]:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    path = Path(config.model_path) if config.model_path else packaged_model_path()
    device = resolve_device(config.device, "worker.device")
    logger.info("loading model", extra={"source": path.name, "device": str(device), "dtype": config.dtype})
    cache_dir = Path(config.cache_dir) if config.cache_dir else REPO_ROOT / ".cache" / "worker"
    # auto: weights load as float32 and every other dtype is derived from that.
    master = torch_dtype("float32" if config.dtype == "auto" else config.dtype)
    runner, weights = ModelRunner.load(
        path, device, master, config.max_context, lambda w: kernel_choice(config, device, w, cache_dir)
    )
    if runner.max_context > weights.args.context_length:
        raise ConfigError(
            f"worker.max_context={config.max_context}: must be <= the model's context length "
            f"{weights.args.context_length}"
        )
    tokenizer = Tokenizer.load(path, cache_dir, weights.eos_token_ids)
    # Here on the model thread, not on the first step: building the decode kernel the first time
    # on a machine takes about a minute (then torch's extension cache has it).
    paged_attention_cpu.available(runner.cache_dtype, device)
    return runner, tokenizer, weights.source
