"""What the router records about a Generate stream as the caller sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from services.common.errors import ResourceExhausted
from services.router.metrics import observe_generate


class Clock:
    def __init__(self, times: list[float]) -> None:
        self._times: Iterator[float] = iter(times)

    def __call__(self) -> float:
        return next(self._times)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _responses(*items: router_pb2.GenerateResponse) -> AsyncIterator[router_pb2.GenerateResponse]:
    for item in items:
        yield item


def _request(priority: int = common_pb2.PRIORITY_INTERACTIVE) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(priority=priority)


async def test_ttft_tpot_tokens_and_degradation_are_recorded() -> None:
    labels = {"model": "m-obs", "priority": "interactive"}
    ttft_before = _value("infermesh_router_time_to_first_token_seconds_sum", **labels)
    tpot_before = _value("infermesh_router_time_per_output_token_seconds_sum", **labels)
    out_before = _value("infermesh_router_tokens_total", tenant="t1", model="m-obs", direction="out")
    capped_before = _value("infermesh_router_requests_degraded_total", step="max_tokens_capped")
    failover_before = _value("infermesh_router_requests_degraded_total", step="failover")
    stream = _responses(
        router_pb2.GenerateResponse(
            model="m-obs",
            text="Hel",
            degraded=[
                common_pb2.Degradation(step=common_pb2.DEGRADATION_STEP_MAX_TOKENS_CAPPED),
                common_pb2.Degradation(step=common_pb2.DEGRADATION_STEP_FAILOVER),
            ],
        ),
        router_pb2.GenerateResponse(text="lo"),
        router_pb2.GenerateResponse(
            text="!",
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=7, completion_tokens=5),
        ),
    )
    # started, first text, end of the last token, duration at the end
    clock = Clock([10.0, 10.5, 11.3, 11.4])
    got = [r async for r in observe_generate(_request(), "t1", stream, clock)]

    assert len(got) == 3
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


async def test_a_refusal_is_counted_by_its_code_and_re_raised() -> None:
    before = _value("infermesh_router_requests_refused_total", reason="resource_exhausted")

    async def refused() -> AsyncIterator[router_pb2.GenerateResponse]:
        raise ResourceExhausted("queue full", 100)
        yield router_pb2.GenerateResponse()  # pragma: no cover

    with pytest.raises(ResourceExhausted):
        [r async for r in observe_generate(_request(common_pb2.PRIORITY_BATCH), "t1", refused())]
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
