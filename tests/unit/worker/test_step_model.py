"""The decode step-time model the worker reports for placement."""

from __future__ import annotations

import random

import pytest

from services.worker.meter import StepTimeModel


def test_recovers_fixed_and_per_sequence_cost() -> None:
    rng = random.Random(0)
    model = StepTimeModel()
    for _ in range(400):
        batch = rng.randint(1, 32)
        model.add(batch, (0.050 + 0.004 * batch) * rng.uniform(0.97, 1.03))
    fixed, per_sequence = model.fit()
    assert fixed == pytest.approx(0.050, rel=0.1)
    assert per_sequence == pytest.approx(0.004, rel=0.1)


def test_one_batch_size_gives_the_mean_step_and_no_growth() -> None:
    model = StepTimeModel()
    for seconds in (0.05, 0.07, 0.06):
        model.add(4, seconds)
    fixed, per_sequence = model.fit()
    assert (fixed, per_sequence) == (pytest.approx(0.06, rel=0.01), 0.0)
    # Said with it: the batch that mean step was taken at, so the router grows it from there.
    assert model.mean_batch == pytest.approx(4.0)


def test_recent_steps_outweigh_old_ones() -> None:
    model = StepTimeModel(halflife_steps=10)
    for batch in (1, 8) * 100:
        model.add(batch, 0.2 + 0.02 * batch)  # a slow phase (a neighbour hogging the device)
    for batch in (1, 8) * 100:
        model.add(batch, 0.05 + 0.005 * batch)
    fixed, per_sequence = model.fit()
    assert fixed == pytest.approx(0.05, rel=0.05) and per_sequence == pytest.approx(0.005, rel=0.05)


def test_nothing_measured_is_zero_and_bad_samples_are_ignored() -> None:
    model = StepTimeModel()
    model.add(0, 0.1)
    model.add(3, 0.0)
    assert (model.fit(), model.mean_batch) == ((0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match="halflife_steps=0"):
        StepTimeModel(halflife_steps=0)
