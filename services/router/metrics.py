"""The router's Prometheus series: Generate as the caller sees it (time to first token, time
per output token, end-to-end latency, tokens by tenant), the admission queue, refusals,
shedding, degradation and failover, and what it knows of the endpoints it places on."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from services.common.errors import DomainError
from services.common.metrics import LATENCY_BUCKETS, rpc_started_var
from services.router.core.queues import Priority, effective_priority

logger = logging.getLogger(__name__)

_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)

TTFT = Histogram(
    "infermesh_router_time_to_first_token_seconds",
    "From the Generate call reaching the router (auth and quota included) to its first generated text.",
    ["model", "priority"],
    buckets=LATENCY_BUCKETS,
)
TPOT = Histogram(
    "infermesh_router_time_per_output_token_seconds",
    "Mean gap between output tokens after the first, per request.",
    ["model", "priority"],
    buckets=_TOKEN_GAP_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "infermesh_router_request_duration_seconds",
    "End-to-end Generate latency, by outcome (finish reason or status code).",
    ["model", "priority", "outcome"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "infermesh_router_tokens_total",
    "Tokens by tenant, model and direction (in: prompt, out: completion).",
    ["tenant", "model", "direction"],
)
QUEUE_WAIT = Histogram(
    "infermesh_router_queue_wait_seconds",
    "Time a Generate waited for a slot in the admission queue (0 when admitted at once).",
    ["priority"],
    buckets=(0, *LATENCY_BUCKETS),
)
REFUSED = Counter(
    "infermesh_router_requests_refused_total",
    "Generate calls that ended with an error status before finishing, by reason (status code).",
    ["reason"],
)
SHED = Counter(
    "infermesh_router_requests_shed_total",
    "Queued requests dropped with RESOURCE_EXHAUSTED, by priority class and reason.",
    ["priority", "reason"],
)
DEGRADED = Counter(
    "infermesh_router_requests_degraded_total",
    "Answers served degraded, by degradation ladder step.",
    ["step"],
)
FAILOVERS = Counter(
    "infermesh_router_failovers_total",
    "Requests moved to another endpoint, by endpoint kind and reason.",
    ["kind", "reason"],
)
GUARDRAIL_HITS = Counter(
    "infermesh_router_guardrail_hits_total",
    "Guardrail verdicts that flagged a request or an answer, by check and action.",
    ["check", "action"],
)


def priority_label(priority: Priority | int) -> str:
    return Priority(priority).name.lower()


def _step_label(step: int) -> str:
    name: str = common_pb2.DegradationStep.Name(step)
    return name.removeprefix("DEGRADATION_STEP_").lower()


async def observe_generate(
    request: router_pb2.GenerateRequest,
    tenant: str,
    stream: AsyncIterator[router_pb2.GenerateResponse],
    clock: Callable[[], float] = time.perf_counter,
) -> AsyncIterator[router_pb2.GenerateResponse]:
    """Relay `stream`, recording what the caller experienced: TTFT, TPOT, latency, tokens,
    degradations and refusals. The priority label is the class the request asked for."""
    # From the moment the call reached the server: auth, quota and guardrails count too.
    started = rpc_started_var.get() or clock()
    priority = priority_label(effective_priority(request.priority))
    model = request.model or "default"
    first: float | None = None
    outcome = "cancelled"
    usage: dict[str, int] = {}
    try:
        async for response in stream:
            if response.model:
                model = response.model
            for note in response.degraded:
                DEGRADED.labels(_step_label(note.step)).inc()
            if first is None and (response.text or response.finish_reason):
                first = clock()
                TTFT.labels(model, priority).observe(first - started)
            if response.finish_reason:
                outcome = common_pb2.FinishReason.Name(response.finish_reason)
                outcome = outcome.removeprefix("FINISH_REASON_").lower()
                _count_tokens(tenant, model, priority, response.usage, first, clock())
                usage = {
                    "prompt_tokens": response.usage.prompt_tokens,
                    "completion_tokens": response.usage.completion_tokens,
                }
            yield response
    except (DomainError, grpc.aio.AioRpcError) as exc:
        code = exc.code if isinstance(exc, DomainError) else exc.code()
        outcome = code.name.lower()
        REFUSED.labels(outcome).inc()
        raise
    finally:
        elapsed = clock() - started
        REQUEST_DURATION.labels(model, priority, outcome).observe(elapsed)
        logger.info(
            "generate finished",
            extra={"model": model, "priority": priority, "outcome": outcome, "duration_s": round(elapsed, 4)}
            | usage,
        )


def _count_tokens(
    tenant: str, model: str, priority: str, usage: Any, first: float | None, now: float
) -> None:
    TOKENS.labels(tenant, model, "in").inc(usage.prompt_tokens)
    TOKENS.labels(tenant, model, "out").inc(usage.completion_tokens)
    if first is not None and usage.completion_tokens > 1:
        TPOT.labels(model, priority).observe((now - first) / (usage.completion_tokens - 1))


class RouterCollector:
    """Gauges read at scrape time from the admission queue and the endpoint registry."""

    def __init__(self, admission: Any, endpoints: Any) -> None:
        self.admission = admission
        self.endpoints = endpoints

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "infermesh_router_queue_depth", "Requests waiting in the admission queue.", labels=["priority"]
        )
        for priority in Priority:
            depth.add_metric([priority_label(priority)], self.admission.queue.depth(priority))
        yield depth
        inflight = GaugeMetricFamily(
            "infermesh_router_inflight_requests", "Generate streams holding a slot on this router."
        )
        inflight.add_metric([], self.admission.inflight)
        yield inflight
        labels = ["address", "kind"]
        usable = GaugeMetricFamily(
            "infermesh_router_endpoint_usable", "1 when placement may use the endpoint.", labels=labels
        )
        age = GaugeMetricFamily(
            "infermesh_router_endpoint_report_age_seconds",
            "Age of the endpoint's latest load report.",
            labels=labels,
        )
        running = GaugeMetricFamily(
            "infermesh_router_endpoint_running_sequences",
            "Running sequences per the endpoint's latest load report.",
            labels=labels,
        )
        for view in self.endpoints.registry.views(self.endpoints.clock()):
            key = [view.address, view.kind.value]
            usable.add_metric(key, float(view.usable))
            if view.report_age_s is not None:
                age.add_metric(key, view.report_age_s)
            if view.load is not None:
                running.add_metric(key, view.load.running)
        yield from (usable, age, running)
