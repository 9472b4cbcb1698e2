"""Chaos drills: every test here is marked `chaos`, and the recorded drill results are printed as
one table at the end of the run (`make chaos`, or any pytest run that includes these tests)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import format_table, recorded

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.chaos)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    results = recorded()
    if results:
        terminalreporter.section("chaos drills")
        terminalreporter.write_line(format_table(results))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where the drill's service processes write their logs (printed on failure by the drills)."""
    folder = tmp_path / "logs"
    folder.mkdir()
    return folder


@pytest.fixture(autouse=True)
def _client_heap_frozen() -> Iterator[None]:
    """The drills time the mesh from this process, whose heap holds whatever the run imported
    and loaded before (torch, models): one full cycle collection over it took 150-190 ms, which
    a drill would have read as the mesh's latency. Frozen while the drill runs, as each service
    freezes its own startup heap, and handed back to the collector afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
