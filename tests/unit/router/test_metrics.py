"""What the router records about a Generate reply as the caller sees it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from services.router.core.domain import Degradation, DegradationStep, FinishReason, ReplyChunk, Usage
from services.router.core.queues import Priority
from services.router.metrics import GenerateObservation


class Clock:
    def __init__(self, times: list[float]) -> None:
        self._times: Iterator[float] = iter(times)

    def __call__(self) -> float:
        return next(self._times)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_ttft_tpot_tokens_and_degradation_are_recorded() -> None:
    labels = {"model": "m-obs", "priority": "interactive"}
    ttft_before = _value("infermesh_router_time_to_first_token_seconds_sum", **labels)
    tpot_before = _value("infermesh_router_time_per_output_token_seconds_sum", **labels)
    out_before = _value("infermesh_router_tokens_total", tenant="t1", model="m-obs", direction="out")
    capped_before = _value("infermesh_router_requests_degraded_total", step="max_tokens_capped")
    failover_before = _value("infermesh_router_requests_degraded_total", step="failover")
    chunks = [
        ReplyChunk(
            "r1",
            text="Hel",
            model="m-obs",
            degraded=(
                Degradation(DegradationStep.MAX_TOKENS_CAPPED, "capped"),
                Degradation(DegradationStep.FAILOVER, "moved"),
            ),
        ),
        ReplyChunk("r1", text="lo"),
        ReplyChunk("r1", text="!", finish=FinishReason.STOP, usage=Usage(7, 5)),
    ]
    # started, first text, end of the last token, duration at the end
    clock = Clock([10.0, 10.5, 11.3, 11.4])
    observed = GenerateObservation("t1", "", Priority.INTERACTIVE, clock)
    for chunk in chunks:
        observed.sent(chunk)
    observed.close()

    assert _value(
        "infermesh_router_time_to_first_token_seconds_sum", **labels
    ) - ttft_before == pytest.approx(0.5)
    # 0.8 s for the 4 tokens after the first
    assert _value(
        "infermesh_router_time_per_output_token_seconds_sum", **labels
    ) - tpot_before == pytest.approx(0.2)
    assert (
        _value("infermesh_router_tokens_total", tenant="t1", model="m-obs", direction="out") - out_before == 5
    )
    assert _value("infermesh_router_requests_degraded_total", step="max_tokens_capped") - capped_before == 1
    assert _value("infermesh_router_requests_degraded_total", step="failover") - failover_before == 1
    assert (
        _value(
            "infermesh_router_request_duration_seconds_count",
            model="m-obs",
            priority="interactive",
            outcome="stop",
        )
        >= 1
    )


def test_a_refusal_is_counted_by_its_code() -> None:
    before = _value("infermesh_router_requests_refused_total", reason="resource_exhausted")
    observed = GenerateObservation("t1", "", Priority.BATCH, Clock([1.0, 1.2]))
    observed.failed("RESOURCE_EXHAUSTED")
    observed.close()
    assert _value("infermesh_router_requests_refused_total", reason="resource_exhausted") - before == 1
    assert (
        _value(
            "infermesh_router_request_duration_seconds_count",
            model="default",
            priority="batch",
            outcome="resource_exhausted",
        )
        >= 1
    )
