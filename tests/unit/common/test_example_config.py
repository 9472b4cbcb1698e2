"""deploy/infermesh.example.toml stays true to the services' config classes."""

from __future__ import annotations

import dataclasses

import pytest

from scripts.gen_example_config import CONFIGS, TARGET, render
from services.common.config import load_config


def test_example_is_up_to_date() -> None:
    assert TARGET.read_text() == render(), "run `python scripts/gen_example_config.py`"


@pytest.mark.parametrize(("section", "cls"), CONFIGS, ids=[s for s, _ in CONFIGS])
def test_example_loads_to_the_defaults(section: str, cls: type) -> None:
    loaded = load_config(cls, section, path=TARGET, env={})
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cls())
