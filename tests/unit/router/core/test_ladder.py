"""Degradation ladder: rungs from measured load, hysteresis, and what each request gets."""

from __future__ import annotations

import pytest

from services.router.core.domain import DegradationStep, ModelKind, ModelSpec
from services.router.core.ladder import (
    Decision,
    Ladder,
    LadderConfig,
    RequestFacts,
    Rung,
    fallback_model,
)
from services.router.core.load import ClusterLoad
from services.router.core.queues import Priority

P = Priority
RATE = 100.0  # tokens/s: a backlog of 100 * s tokens is a wait of s seconds
CONFIG = LadderConfig(thresholds_s=(2.0, 4.0, 6.0, 10.0, 20.0), step_down_margin=0.2, capped_max_tokens=64)


def wait(seconds: float) -> float:
    """The wait the load model predicts with `seconds` worth of tokens queued at the workers."""
    return ClusterLoad(tokens_per_s=RATE, waiting_tokens=round(seconds * RATE)).wait_s()


def make_ladder() -> Ladder:
    return Ladder(CONFIG)


def request(priority: Priority = P.STANDARD, max_tokens: int = 512, **facts: object) -> RequestFacts:
    return RequestFacts(priority, max_tokens, **facts)  # type: ignore[arg-type]


def decide_at(seconds: float, req: RequestFacts) -> Decision:
    return make_ladder().decide(req, wait(seconds))


def steps(decision: Decision) -> list[DegradationStep]:
    return [d.step for d in decision.steps]


@pytest.mark.parametrize(
    ("seconds", "rung"),
    [(0, Rung.NORMAL), (1.9, Rung.NORMAL), (2, Rung.CAP_MAX_TOKENS), (5, Rung.FALLBACK_MODEL),
     (6, Rung.CACHED_REPLIES), (10, Rung.HOLD_BATCH), (25, Rung.REFUSE)],
)  # fmt: skip
def test_rung_follows_predicted_wait(seconds: float, rung: Rung) -> None:
    assert make_ladder().update(wait(seconds)) is rung


def test_no_throughput_measured_with_a_backlog_is_the_top_rung() -> None:
    assert make_ladder().update(ClusterLoad(tokens_per_s=0.0, waiting_tokens=10).wait_s()) is Rung.REFUSE
    assert make_ladder().update(ClusterLoad(tokens_per_s=0.0).wait_s()) is Rung.NORMAL


def test_ladder_climbs_at_once_and_steps_down_with_a_margin() -> None:
    ladder = make_ladder()
    assert ladder.update(wait(6.5)) is Rung.CACHED_REPLIES
    assert ladder.update(wait(5.0)) is Rung.CACHED_REPLIES  # 5.0 >= 6 * 0.8: stays
    assert ladder.update(wait(4.7)) is Rung.FALLBACK_MODEL  # below 4.8, still >= 4 * 0.8
    assert ladder.update(wait(1.0)) is Rung.NORMAL  # far below every rung: all the way down


def test_normal_load_changes_nothing() -> None:
    decision = decide_at(1.0, request(P.BATCH, allow_fallback=True, fallback_model="small"))
    assert decision == Decision(Rung.NORMAL, 512)


def test_first_rung_caps_standard_and_batch_but_not_interactive() -> None:
    for priority in (P.STANDARD, P.BATCH):
        decision = decide_at(3.0, request(priority))
        assert decision.max_tokens == 64 and steps(decision) == [DegradationStep.MAX_TOKENS_CAPPED]
        assert "predicted wait 3.0s" in decision.steps[0].reason
    assert decide_at(3.0, request(P.INTERACTIVE)).max_tokens == 512
    assert decide_at(3.0, request(P.STANDARD, max_tokens=10)).steps == ()  # already under the cap


def test_second_rung_moves_only_opted_in_requests_to_a_smaller_model() -> None:
    opted_in = decide_at(5.0, request(P.INTERACTIVE, allow_fallback=True, fallback_model="small"))
    assert opted_in.model == "small" and steps(opted_in) == [DegradationStep.FALLBACK_MODEL]
    assert decide_at(5.0, request(P.INTERACTIVE, fallback_model="small")).model is None
    assert decide_at(5.0, request(P.INTERACTIVE, allow_fallback=True)).model is None  # no smaller tier
    assert decide_at(3.0, request(P.INTERACTIVE, allow_fallback=True, fallback_model="small")).model is None


def test_third_rung_answers_deterministic_repeats_from_the_cache() -> None:
    hit = decide_at(7.0, request(deterministic=True, cached=True))
    assert hit.from_cache and steps(hit) == [DegradationStep.CACHED_REPLY]
    assert not decide_at(7.0, request(deterministic=False, cached=True)).from_cache
    assert not decide_at(5.0, request(deterministic=True, cached=True)).from_cache


def test_fourth_rung_holds_batch_only() -> None:
    assert decide_at(12.0, request(P.BATCH)).hold
    held_standard = decide_at(12.0, request(P.STANDARD))
    assert not held_standard.hold and held_standard.max_tokens == 64


def test_top_rung_refuses_all_but_critical_with_pushback() -> None:
    refused = decide_at(30.0, request(P.INTERACTIVE))
    # Back when the wait is below the point where the ladder leaves the top rung (16 s).
    assert refused.refuse_retry_after_ms == 14_000
    assert decide_at(30.0, request(P.CRITICAL)) == Decision(Rung.REFUSE, 512)
    assert decide_at(20.0, request()).refuse_retry_after_ms == 4000


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="thresholds_s"):
        LadderConfig(thresholds_s=(2.0, 1.0, 3.0, 4.0, 5.0))
    with pytest.raises(ValueError, match="step_down_margin"):
        LadderConfig(step_down_margin=1.0)


def model(model_id: str, tier: str, context_length: int = 2048) -> ModelSpec:
    return ModelSpec(model_id, ModelKind.CHAT, context_length=context_length, tier=tier)


def test_fallback_is_the_largest_smaller_tier_that_holds_the_request() -> None:
    large, medium, small = model("l", "large"), model("m", "medium"), model("s", "small")
    catalog = [small, large, medium, model("e", "small", 0)]
    assert fallback_model(large, catalog, 100) == "m"
    assert fallback_model(medium, catalog, 100) == "s"
    assert fallback_model(small, catalog, 100) is None
    assert fallback_model(model("x", ""), catalog, 100) is None  # no tier: nothing is smaller
    short = model("m", "medium", context_length=50)
    assert fallback_model(large, [short, small], 100) == "s"  # the medium one cannot hold it
    embedding = ModelSpec("emb", ModelKind.EMBEDDING, tier="small")
    assert fallback_model(medium, [embedding], 10) is None
