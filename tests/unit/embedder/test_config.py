"""Embedder configuration: defaults, environment, bounds."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.embedder.config import EmbedderConfig


def test_defaults() -> None:
    config = load_config(EmbedderConfig, "embedder", env={})
    assert (config.host, config.port, config.model_id, config.device) == (
        "127.0.0.1",
        50054,
        "all-minilm-l6-v2",
        "auto",
    )
    assert config.model_path == ""


def test_environment_overrides() -> None:
    env = {"INFERMESH_EMBEDDER_MAX_WAIT_MS": "5", "INFERMESH_EMBEDDER_DEVICE": "cpu"}
    config = load_config(EmbedderConfig, "embedder", env=env)
    assert (config.max_wait_ms, config.device) == (5.0, "cpu")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_tokens", "0", "embedder.max_batch_tokens=0: must be >= 1"),
        ("max_items_per_request", "0", "embedder.max_items_per_request=0: must be >= 1"),
        ("device", "tpu", "embedder.device='tpu': must be one of"),
        ("max_wait_ms", "-1", "embedder.max_wait_ms=-1.0: must be >= 0"),
    ],
)
def test_bad_values_are_named(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(EmbedderConfig, "embedder", env={f"INFERMESH_EMBEDDER_{field.upper()}": value})
