"""Measure each candidate kernel at each batch size on this device, and plan from the timings.

The worker does this once at start, on the model it serves: the same CPU behaves differently
with AVX-512, AVX2 only or AMX, and nothing but a measurement tells which kernel wins where. A
plan measured once is kept on disk under a key of everything it depends on, so a restart of the
same worker on the same machine does not pay the timings again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.worker.model.kernels import Kernel, KernelPlan, int4_available, int8_available
from services.worker.model.llama import LlamaModel

logger = logging.getLogger(__name__)

# Step sizes timed: decode batches up to the largest, prompt chunks beyond.
ROW_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A kernel this many times slower than the best, and further behind than at the size before,
# is not timed at larger sizes.
GIVE_UP_FACTOR = 2.0
GIVE_UP_ROWS = 32
_REPEATS = 3


def candidates(device: torch.device, dtype: str, weights: str, shipped: str | None) -> list[Kernel]:
    """The kernels a worker may choose among.

    dtype "auto": float32 and bfloat16 (and float16 on a GPU); else just that one. weights
    "auto": dense, plus the format the model file ships in ("int4" for Q4_1) where this device
    has a kernel for it; "dense", "int4", "int8": only that.
    """
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    else:
        dtypes = [names[dtype]]
    available = {"int4": int4_available(device), "int8": int8_available(device)}
    if weights == "auto":
        formats = ["dense"] + ([shipped] if shipped is not None and available.get(shipped) else [])
    else:
        if weights != "dense" and not available[weights]:
            raise ValueError(f"weights={weights!r}: no {weights} kernel on {device.type}")
        formats = [weights]
    kernels = [Kernel(f, d) for f in formats for d in dtypes]
    if dtype == "auto" or weights == "auto":
        # torch's CPU 4-bit kernel is fast with bfloat16 inputs only; with float32 ones it is the
        # slow reference path (tens of times slower than dense): never worth timing.
        kernels = [k for k in kernels if k.weights == "dense" or k.dtype == torch.bfloat16]
    return kernels


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds of one forward pass (every layer and the vocabulary projection) by rows and kernel."""

    rows: tuple[int, ...]
    seconds: dict[str, dict[int, float]]

    def plan(self, kernels: Sequence[Kernel]) -> KernelPlan:
        """Each kernel over one range of sizes, the ranges chosen to lose least against the fastest
        kernel at each size (summed ratios). One range each: timings swing, and a plan that flips
        back and forth between two kernels would only be following the noise."""
        by_name = {k.name: k for k in kernels}
        best = {rows: min(t[rows] for t in self.seconds.values() if rows in t) for rows in self.rows}

        def cost(name: str, rows: int) -> float:
            timed = self.seconds[name].get(rows)
            # Not timed at this size: given up on as far behind.
            return timed / best[rows] if timed is not None else GIVE_UP_FACTOR * 4

        # Smallest summed cost of covering sizes [i:] given the kernels already used.
        @functools.cache
        def cover(i: int, used: frozenset[str]) -> tuple[float, tuple[tuple[int, str], ...]]:
            if i == len(self.rows):
                return 0.0, ()
            options = []
            for name in self.seconds:
                if name in used:
                    continue
                total = 0.0
                for j in range(i, len(self.rows)):
                    total += cost(name, self.rows[j])
                    rest, segments = cover(j + 1, used | {name})
                    options.append((total + rest, ((self.rows[j], name), *segments)))
            return min(options, key=lambda o: o[0], default=(float("inf"), ()))

        _, segments = cover(0, frozenset())
        return KernelPlan.from_fastest([(rows, by_name[name]) for rows, name in segments])

    def table(self) -> str:
        names = list(self.seconds)
        lines = ["rows " + " ".join(f"{n:>10}" for n in names)]
        for rows in self.rows:
            cells = [self.seconds[n].get(rows) for n in names]
            lines.append(f"{rows:>4} " + " ".join(f"{c * 1e3:>8.2f}ms" if c else f"{'-':>10}" for c in cells))
        return "\n".join(lines)


def measure(
    model: LlamaModel,
    kernels: Sequence[Kernel],
    *,
    max_rows: int,
    max_sampled_rows: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time one decoder layer (times the layer count) plus the vocabulary projection of the rows
    that sample, for each kernel at each size up to `max_rows`. Dropping a kernel once it is far
    behind keeps start-up short: the slow ones are slowest at the largest sizes."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    sizes = (*(r for r in ROW_SIZES if r < max_rows), max_rows)
    seconds: dict[str, dict[int, float]] = {k.name: {} for k in kernels}
    alive = list(kernels)
    layer = model.layers[0]
    layers = len(model.layers)
    last_ratios: dict[str, float] = {}
    with torch.inference_mode():
        for rows in sizes:
            # The vocabulary head runs in the model's dtype under every kernel: timed once.
            sampled_rows = torch.randn(
                min(rows, max_sampled_rows), model.args.hidden_size, device=device, dtype=dtype
            )
            head_s = _best_time(lambda s=sampled_rows: model.compute_logits(s), device, clock)
            for kernel in alive:
                x = torch.randn(1, rows, model.args.hidden_size, device=device, dtype=dtype)
                rope = model.rope(torch.arange(rows, device=device).unsqueeze(0), dtype)
                ctx = NoAttention(*rope, kernel)
                layer_s = _best_time(lambda x=x, ctx=ctx: layer(x, ctx), device, clock)
                seconds[kernel.name][rows] = layer_s * layers + head_s
            best = min(seconds[k.name][rows] for k in alive)
            ratios = {k.name: seconds[k.name][rows] / best for k in alive}
            # Far behind and falling further: it will not catch up at larger sizes. (Small sizes
            # cost little to time, and their ratios swing most: every kernel runs up to GIVE_UP_ROWS.)
            alive = [
                k
                for k in alive
                if rows < GIVE_UP_ROWS
                or ratios[k.name] <= GIVE_UP_FACTOR
                or ratios[k.name] < last_ratios.get(k.name, float("inf"))
            ]
            last_ratios = ratios
    return Timings(sizes, seconds)


def _best_time(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    fn()  # warm-up: first calls allocate and pick algorithms
    best = float("inf")
    for _ in range(_REPEATS):
        _sync(device)
        started = clock()
        fn()
        _sync(device)
        best = min(best, clock() - started)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class NoAttention:
    """A pass's context without attention: the projections are what the kernels differ in."""

    cos: torch.Tensor
    sin: torch.Tensor
    kernel: Kernel | None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q


def plan_key(model: LlamaModel, kernels: Sequence[Kernel], device: torch.device, max_rows: int) -> str:
    """What a measured plan depends on: model shape, kernels, device, threads, torch."""
    from services.common.device import device_stats

    # The formats each kernel really runs (a weight the file did not ship quantised may run dense).
    uses = [f"{k.name}:{model.layers[0].mlp.down_proj.uses(k)}" for k in kernels]
    uses.append("head:model-dtype")  # plans timed with the head in a kernel's dtype are stale
    parts = [
        repr(model.args),
        ",".join(uses),
        device_stats(device, "").name,
        str(torch.get_num_threads()),
        torch.__version__,
        str(max_rows),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_or_measure(
    model: LlamaModel,
    kernels: Sequence[Kernel],
    *,
    max_rows: int,
    max_sampled_rows: int,
    cache_dir: Path | None,
) -> KernelPlan:
    """The plan for these kernels: from the cache when this machine measured it before."""
    if len(kernels) == 1:
        return KernelPlan.single(kernels[0])
    device = model.embed_tokens.weight.device
    file = None
    if cache_dir is not None:
        file = cache_dir / f"kernel-plan-{plan_key(model, kernels, device, max_rows)}.json"
        try:
            saved = json.loads(file.read_text())
            return KernelPlan(tuple(saved["bounds"]), tuple(Kernel.parse(n) for n in saved["kernels"]))
        except (OSError, ValueError, KeyError):
            pass
    started = time.perf_counter()
    timings = measure(model, kernels, max_rows=max_rows, max_sampled_rows=max_sampled_rows)
    plan = timings.plan(kernels)
    logger.info(
        "kernels measured",
        extra={"plan": plan.describe(), "seconds": round(time.perf_counter() - started, 2)},
    )
    logger.debug("kernel timings per pass\n%s", timings.table())
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            payload = {"bounds": list(plan.bounds), "kernels": [k.name for k in plan.kernels]}
            file.write_text(json.dumps(payload))
        except OSError as exc:
            logger.warning("kernel plan not cached: %s", exc)
    return plan
