"""Shared pytest setup: generated protos must exist before any test imports them."""

from __future__ import annotations

import pathlib

pytest_plugins = ["tests.fixtures.databases"]

ROOT = pathlib.Path(__file__).resolve().parent.parent

if not (ROOT / "infermesh" / "common" / "v1" / "common_pb2.py").exists():
    raise RuntimeError("generated protos are missing: run `make proto` (or `make test`, which does it)")
