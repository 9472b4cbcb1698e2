"""Worker config: defaults, environment, and errors that name the value."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.worker.config import WorkerConfig


def test_defaults() -> None:
    config = load_config(WorkerConfig, "worker", env={})
    assert (config.port, config.model_id, config.dtype, config.weights, config.device) == (
        50053,
        "smollm2-135m-instruct",
        "auto",
        "auto",
        "auto",
    )


def test_environment_overrides() -> None:
    env = {"INFERMESH_WORKER_DTYPE": "float32", "INFERMESH_WORKER_MAX_TOKENS_LIMIT": "100"}
    config = load_config(WorkerConfig, "worker", env=env, overrides={"default_max_tokens": 50})
    assert (config.dtype, config.max_tokens_limit, config.default_max_tokens) == ("float32", 100, 50)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "int4"}, "worker.dtype='int4'"),
        ({"weights": "q4_k"}, "worker.weights='q4_k'"),
        ({"port": -1}, "worker.port=-1: must be >= 0"),
        ({"default_max_tokens": 600, "max_tokens_limit": 500}, "worker.default_max_tokens=600"),
    ],
)
def test_bad_values_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(WorkerConfig, "worker", env={}, overrides=overrides)
