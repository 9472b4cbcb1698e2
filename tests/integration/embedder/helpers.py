"""Builders for the embedder's integration tests."""

from __future__ import annotations

from services.common.config import load_config
from services.embedder.config import EmbedderConfig


def embedder_config(**overrides: object) -> EmbedderConfig:
    """Defaults, but a free port and the CPU whatever the machine has."""
    return load_config(
        EmbedderConfig, "embedder", env={}, overrides={"port": 0, "device": "cpu", **overrides}
    )
