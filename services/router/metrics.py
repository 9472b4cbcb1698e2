"""The router's Prometheus series: Generate as the caller sees it (time to first token, time
per output token, end-to-end latency, tokens by tenant), the admission queue, refusals,
shedding, degradation and failover, and what it knows of the endpoints it places on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from services.common.metrics import LATENCY_BUCKETS, rpc_started_var
from services.router.core.domain import ReplyChunk, Usage
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


class GenerateObservation:
    """What the caller of one Generate experienced, recorded as its reply goes out: TTFT,
    TPOT, latency, tokens, degradations and refusals. The priority label is the class the
    request asked for; the model label is the one that answered, once known."""

    def __init__(
        self, tenant: str, model: str, priority: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        # From the moment the call reached the server: auth, quota and guardrails count too.
        self.started = rpc_started_var.get() or clock()
        self.tenant = tenant
        self.model = model or "default"
        self.priority = priority_label(effective_priority(priority))
        self.first: float | None = None
        self.outcome = "cancelled"  # until it finishes or fails
        self.usage: Usage | None = None

    def sent(self, chunk: ReplyChunk) -> None:
        if chunk.model:
            self.model = chunk.model
        for note in chunk.degraded:
            DEGRADED.labels(note.step.value).inc()
        if self.first is None and (chunk.text or chunk.finish is not None):
            self.first = self.clock()
            TTFT.labels(self.model, self.priority).observe(self.first - self.started)
        first = self.first
        if chunk.finish is not None:
            self.outcome = chunk.finish.value
            self.usage = chunk.usage or Usage()
            TOKENS.labels(self.tenant, self.model, "in").inc(self.usage.prompt_tokens)
            TOKENS.labels(self.tenant, self.model, "out").inc(self.usage.completion_tokens)
            if first is not None and self.usage.completion_tokens > 1:
                gap = (self.clock() - first) / (self.usage.completion_tokens - 1)
                TPOT.labels(self.model, self.priority).observe(gap)

    def failed(self, status: str) -> None:
        """The call ended with an error status (its name) before finishing."""
        self.outcome = status.lower()
        REFUSED.labels(self.outcome).inc()

    def close(self) -> None:
        elapsed = self.clock() - self.started
        REQUEST_DURATION.labels(self.model, self.priority, self.outcome).observe(elapsed)
        usage = {}
        if self.usage is not None:
            usage = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            }
        logger.info(
            "generate finished",
            extra={
                "model": self.model,
                "priority": self.priority,
                "outcome": self.outcome,
                "duration_s": round(elapsed, 4),
            }
            | usage,
        )


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
