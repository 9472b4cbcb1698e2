"""The one load model: step growth, the cluster's capacity and speed, the deadline check."""

from __future__ import annotations

import math

import pytest

from services.router.core.load import ClusterLoad, EndpointLoad, LoadModel, Priors, StepModel

SHARE = 0.1


def test_a_fitted_line_gives_the_step_at_any_batch() -> None:
    step = StepModel(fixed_s=0.05, per_sequence_s=0.004, batch=12.0)
    assert step.seconds(1, SHARE) == pytest.approx(0.054)
    assert step.seconds(64, SHARE) == pytest.approx(0.05 + 64 * 0.004)


def test_unmeasured_growth_starts_from_the_batch_the_step_was_measured_at() -> None:
    # A worker that only ever ran full batches of 64 reports its mean step there, with no
    # growth measured. At that batch the prediction is the measured step, not the step grown
    # by the prior share a second time (7.4x too slow at 64 for a share of 0.1).
    full = StepModel(fixed_s=0.30, batch=64.0)
    assert full.seconds(64, SHARE) == pytest.approx(0.30)
    assert full.seconds(32, SHARE) == pytest.approx(0.30 * (1 + 3.2) / (1 + 6.4))
    assert full.seconds(64, SHARE) / full.seconds(32, SHARE) < 2  # grows, less than in proportion
    # Batch not said (an older worker): the step is taken as that of an empty batch.
    assert StepModel(fixed_s=0.30).seconds(64, SHARE) == pytest.approx(0.30 * (1 + 6.4))


def test_measured_means_either_part_of_the_line() -> None:
    assert not StepModel().measured
    assert StepModel(fixed_s=0.01).measured and StepModel(per_sequence_s=0.001).measured


def test_finish_joins_the_running_batch_after_the_pending_prompts() -> None:
    model = LoadModel(Priors(prefill_tokens_per_s=100.0))
    worker = EndpointLoad(
        "w", sequences=7, pending_prompt_tokens=300, prefill_tokens_per_s=400.0, step=StepModel(0.05, 0.004)
    )
    # 100 steps at a batch of 8, after 300 + 200 prompt tokens at the measured prefill speed.
    assert model.finish_s(worker, 200, 100) == pytest.approx(100 * (0.05 + 8 * 0.004) + 500 / 400)


def test_finish_before_any_step_model_drains_the_backlog_at_the_reported_speed() -> None:
    model = LoadModel(Priors(decode_tokens_per_s=10.0, prefill_tokens_per_s=100.0, tokens_per_sequence=50))
    assert model.finish_s(EndpointLoad("a", backlog_tokens=300, decode_tokens_per_s=40.0), 0, 100) == (
        pytest.approx(400 / 40)
    )
    assert model.finish_s(EndpointLoad("b", sequences=3), 200, 10) == pytest.approx((150 + 10) / 10 + 2.0)


def test_cluster_capacity_and_full_batch_speed() -> None:
    model = LoadModel(Priors(decode_tokens_per_s=10.0), streams_per_worker=16, headroom_share=0.25)
    endpoints = [
        EndpointLoad("measured", decode_tokens_per_s=20.0, step=StepModel(0.04, 0.002), waiting_tokens=300),
        EndpointLoad("rate-only", decode_tokens_per_s=30.0, waiting_tokens=100),
        EndpointLoad("new"),
    ]
    cluster = model.cluster(endpoints)
    assert (cluster.workers, cluster.slots, cluster.headroom, cluster.waiting_tokens) == (3, 48, 12, 400)
    # A queue forms only once the workers are full: the measured worker counts at 16 streams
    # a step (not at the 20 tok/s it shows lightly loaded); the others by report, then prior.
    assert cluster.tokens_per_s == pytest.approx(16 / (0.04 + 16 * 0.002) + 30.0 + 10.0)
    assert model.cluster([]) == ClusterLoad(min_retry_after_ms=model.min_retry_after_ms)


def test_waits_deadlines_and_pushback_come_from_one_estimate() -> None:
    cluster = ClusterLoad(workers=1, slots=4, tokens_per_s=100.0, waiting_tokens=200, min_retry_after_ms=50)
    assert cluster.wait_s() == pytest.approx(2.0)
    assert cluster.wait_s(ahead_tokens=300) == pytest.approx(5.0)
    assert cluster.finish_s(300, 100) == pytest.approx(6.0)
    assert cluster.misses(5.9, 300, 100) and not cluster.misses(6.0, 300, 100)
    assert not cluster.misses(None, 10**9, 10**9)  # no deadline is never missed
    assert cluster.retry_after_ms(300) == 5000
    assert ClusterLoad(min_retry_after_ms=50).retry_after_ms(0) == 50
    assert ClusterLoad(tokens_per_s=1.0).retry_after_ms(10**9) == 3600 * 1000  # at most an hour


def test_no_speed_known_makes_any_queued_work_endless() -> None:
    idle = ClusterLoad()
    assert idle.wait_s() == 0.0 and idle.seconds_for(0) == 0.0
    assert math.isinf(ClusterLoad(waiting_tokens=1).wait_s())
    assert ClusterLoad(workers=1).misses(1000.0, 0, 1)
    # No usable worker: no estimate, so no deadline refusal (placement answers UNAVAILABLE,
    # or the queue holds the request until a worker is back).
    assert not idle.misses(1000.0, 0, 1) and not ClusterLoad(waiting_tokens=5).misses(0.1, 5, 5)


def test_bad_settings_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="streams_per_worker=0"):
        LoadModel(streams_per_worker=0)
    with pytest.raises(ValueError, match="headroom_share=-1"):
        LoadModel(headroom_share=-1)
