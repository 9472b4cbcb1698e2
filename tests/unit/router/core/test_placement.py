"""Placement: hardware filter, predicted completion from measured speed, session affinity."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from services.router.core.load import EndpointLoad, LoadModel, Priors, StepModel
from services.router.core.placement import (
    Ask,
    HardwareNeeds,
    LeastLoaded,
    PredictedCompletion,
    create_placement_policy,
    fitting,
    least_loaded,
)

PRIORS = Priors(decode_tokens_per_s=10.0, prefill_tokens_per_s=100.0, tokens_per_sequence=50)
MODEL = LoadModel(PRIORS)


def endpoint(address: str, **fields: object) -> EndpointLoad:
    return EndpointLoad(address, **fields)  # type: ignore[arg-type]


def predicted_seconds(endpoint: EndpointLoad, ask: Ask) -> float:
    return MODEL.finish_s(endpoint, ask.prompt_tokens, ask.max_tokens)


def place_burst(policy: PredictedCompletion, candidates: list[EndpointLoad], asks: list[Ask]) -> Counter[str]:
    """Place `asks` one after another, adding each to its endpoint's backlog as the registry does."""
    by_address = {c.address: c for c in candidates}
    tokens: Counter[str] = Counter()
    for ask in asks:
        picked = policy.choose(list(by_address.values()), ask)
        tokens[picked.address] += ask.max_tokens
        by_address[picked.address] = replace(picked, backlog_tokens=picked.backlog_tokens + ask.max_tokens)
    return tokens


# --- hardware filter ------------------------------------------------------------------------


def test_fitting_keeps_what_meets_every_need_and_says_why_not() -> None:
    cpu = endpoint("cpu", device_type="cpu", memory_total_bytes=8 << 30, context_length=2048)
    gpu = endpoint("gpu", device_type="cuda", memory_total_bytes=80 << 30, context_length=8192)
    kept, reasons = fitting([cpu, gpu], HardwareNeeds(device_type="cuda"))
    assert kept == [gpu] and reasons == ["cpu device cpu is not cuda"]
    kept, reasons = fitting([cpu, gpu], HardwareNeeds(min_memory_bytes=16 << 30))
    assert kept == [gpu] and reasons == [f"cpu memory {8 << 30} bytes < {16 << 30} needed"]
    kept, reasons = fitting([cpu, gpu], HardwareNeeds(context_tokens=4096))
    assert kept == [gpu] and reasons == ["cpu context 2048 tokens < 4096 needed"]
    assert fitting([cpu, gpu], HardwareNeeds()) == ([cpu, gpu], [])


def test_unknown_context_length_does_not_exclude() -> None:
    assert fitting([endpoint("a")], HardwareNeeds(context_tokens=10**6))[0] == [endpoint("a")]


# --- predicted completion -------------------------------------------------------------------


def test_prediction_uses_measured_speeds_and_priors_until_measured() -> None:
    ask = Ask(prompt_tokens=200, max_tokens=100)
    measured = endpoint("a", backlog_tokens=300, decode_tokens_per_s=40.0, prefill_tokens_per_s=400.0)
    assert predicted_seconds(measured, ask) == pytest.approx((300 + 100) / 40 + 200 / 400)
    unmeasured = endpoint("b", backlog_tokens=300)
    assert predicted_seconds(unmeasured, ask) == pytest.approx((300 + 100) / 10 + 200 / 100)


def test_sequence_counts_stand_in_when_tokens_are_not_reported() -> None:
    ask = Ask(max_tokens=10)
    assert predicted_seconds(endpoint("a", sequences=3), ask) == pytest.approx((3 * 50 + 10) / 10)


def test_faster_endpoint_wins_at_equal_backlog_slower_wins_when_far_less_loaded() -> None:
    policy = PredictedCompletion(MODEL)
    slow = endpoint("slow", backlog_tokens=100, decode_tokens_per_s=10.0)
    fast = endpoint("fast", backlog_tokens=100, decode_tokens_per_s=30.0)
    assert policy.choose([slow, fast], Ask(max_tokens=10)).address == "fast"
    busy_fast = replace(fast, backlog_tokens=1000)  # (1000+10)/30 = 33.7 s > (100+10)/10 = 11 s
    assert policy.choose([slow, busy_fast], Ask(max_tokens=10)).address == "slow"


@pytest.mark.parametrize("speeds", [(10.0, 30.0), (20.0, 20.0), (5.0, 45.0)])
def test_work_splits_in_proportion_to_measured_speed(speeds: tuple[float, float]) -> None:
    policy = PredictedCompletion(MODEL)
    candidates = [endpoint("a", decode_tokens_per_s=speeds[0]), endpoint("b", decode_tokens_per_s=speeds[1])]
    tokens = place_burst(policy, candidates, [Ask(max_tokens=20)] * 400)
    share_a = tokens["a"] / (tokens["a"] + tokens["b"])
    assert share_a == pytest.approx(speeds[0] / sum(speeds), abs=0.01)


def test_a_step_model_predicts_decoding_alongside_the_running_batch() -> None:
    ask = Ask(prompt_tokens=200, max_tokens=100)
    worker = endpoint(
        "a", sequences=7, step=StepModel(fixed_s=0.05, per_sequence_s=0.004), prefill_tokens_per_s=400.0
    )
    # Joins a batch of 8: 100 steps of 0.05 + 8 * 0.004 s, after its prompt.
    assert predicted_seconds(worker, ask) == pytest.approx(100 * (0.05 + 8 * 0.004) + 200 / 400)
    # Prompts placed there since its report are prefilled before (or with) ours.
    queued = replace(worker, pending_prompt_tokens=600)
    assert predicted_seconds(queued, ask) == pytest.approx(predicted_seconds(worker, ask) + 600 / 400)
    # Growth not measured yet (the batch never varied): the prior share of the fixed cost.
    flat = replace(worker, step=StepModel(fixed_s=0.05))
    assert predicted_seconds(flat, ask) == pytest.approx(
        100 * (0.05 * (1 + 8 * PRIORS.per_sequence_share)) + 200 / 400
    )


def test_a_worker_with_fewer_streams_does_not_look_slower() -> None:
    # The aggregate speed of a worker running 2 streams is lower than that of one running 16,
    # but a request placed on it finishes sooner: the step model sees that.
    policy = PredictedCompletion(MODEL)
    step = StepModel(fixed_s=0.06, per_sequence_s=0.004)
    light = endpoint("light", sequences=2, decode_tokens_per_s=30.0, step=step)
    heavy = endpoint("heavy", sequences=16, decode_tokens_per_s=120.0, step=step)
    assert policy.choose([heavy, light], Ask(max_tokens=32)).address == "light"


@pytest.mark.parametrize(("fast", "slow"), [((0.02, 0.002), (0.04, 0.004)), ((0.05, 0.001), (0.05, 0.005))])
def test_streams_settle_where_steps_take_equally_long(
    fast: tuple[float, float], slow: tuple[float, float]
) -> None:
    policy = PredictedCompletion(MODEL)
    by_address = {
        "fast": endpoint("fast", step=StepModel(*fast)),
        "slow": endpoint("slow", step=StepModel(*slow)),
    }
    for _ in range(60):
        picked = policy.choose(list(by_address.values()), Ask(max_tokens=16))
        by_address[picked.address] = replace(picked, sequences=picked.sequences + 1)
    steps = {a: c.step.fixed_s + c.step.per_sequence_s * c.sequences for a, c in by_address.items()}
    # Each new stream went where its steps were shortest: the two end within one stream's cost.
    assert abs(steps["fast"] - steps["slow"]) <= max(fast[1], slow[1])
    assert by_address["fast"].sequences > by_address["slow"].sequences


def test_equal_endpoints_rotate() -> None:
    policy = PredictedCompletion(MODEL)
    candidates = [endpoint("a"), endpoint("b"), endpoint("c")]
    assert [policy.choose(candidates, Ask()).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        PredictedCompletion().choose([], Ask())


# --- session affinity -----------------------------------------------------------------------


def test_session_sticks_to_its_endpoint_within_the_factor() -> None:
    policy = PredictedCompletion(MODEL, affinity_factor=2.0)
    a, b = endpoint("a", backlog_tokens=100), endpoint("b", backlog_tokens=100)
    first = policy.choose([a, b], Ask(max_tokens=10, session_id="s")).address
    assert first == "a"
    # "a" is now busier (21 s vs 11 s predicted), still within twice the best: stays.
    a = replace(a, backlog_tokens=200)
    assert [policy.choose([a, b], Ask(max_tokens=10, session_id="s")).address for _ in range(3)] == ["a"] * 3
    assert policy.choose([a, b], Ask(max_tokens=10)).address == "b"  # no session: best wins


def test_session_moves_when_its_endpoint_is_overloaded_or_gone() -> None:
    policy = PredictedCompletion(MODEL, affinity_factor=1.5)
    a, b = endpoint("a"), endpoint("b", backlog_tokens=50)
    assert policy.choose([a, b], Ask(max_tokens=10, session_id="s")).address == "a"
    overloaded = replace(a, backlog_tokens=500)  # 51 s vs 6 s
    assert policy.choose([overloaded, b], Ask(max_tokens=10, session_id="s")).address == "b"
    assert policy.session_endpoint("s") == "b"
    assert policy.choose([a], Ask(max_tokens=10, session_id="s")).address == "a"  # "b" gone


def test_without_session_affinity_a_session_is_placed_like_any_request() -> None:
    policy = PredictedCompletion(MODEL, affinity_factor=2.0, session_affinity=False)
    a, b = endpoint("a", backlog_tokens=100), endpoint("b", backlog_tokens=100)
    assert policy.choose([a, b], Ask(max_tokens=10, session_id="s")).address == "a"
    a = replace(a, backlog_tokens=200)  # within the factor, but affinity is off: best wins
    assert policy.choose([a, b], Ask(max_tokens=10, session_id="s")).address == "b"
    assert policy.session_endpoint("s") is None


def test_session_memory_is_bounded_oldest_first() -> None:
    policy = PredictedCompletion(MODEL, max_sessions=2)
    for session in ("s1", "s2", "s3"):
        policy.choose([endpoint("a")], Ask(session_id=session))
    assert policy.session_endpoint("s1") is None
    assert policy.session_endpoint("s3") == "a"


def test_affinity_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"affinity_factor=0.5: must be >= 1"):
        PredictedCompletion(affinity_factor=0.5)


# --- least loaded and the factory -----------------------------------------------------------


def test_least_loaded_wins_and_ties_rotate() -> None:
    candidates = [endpoint("a", sequences=1), endpoint("b"), endpoint("c")]
    assert [least_loaded(candidates, turn).address for turn in range(4)] == ["b", "c", "b", "c"]
    policy = LeastLoaded()
    assert [policy.choose(candidates, Ask()).address for _ in range(2)] == ["b", "c"]
    with pytest.raises(ValueError, match="no candidates"):
        least_loaded([], 0)


def test_factory_knows_its_policies() -> None:
    assert isinstance(create_placement_policy(), PredictedCompletion)
    assert isinstance(create_placement_policy("least_loaded"), LeastLoaded)
    with pytest.raises(ValueError, match="unknown placement policy 'random'"):
        create_placement_policy("random")
