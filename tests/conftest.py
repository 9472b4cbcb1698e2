"""Shared pytest setup: generated protos must exist before any test imports them."""

from __future__ import annotations

import pathlib

import pytest

pytest_plugins = ["tests.fixtures.databases"]

ROOT = pathlib.Path(__file__).resolve().parent.parent

if not (ROOT / "infermesh" / "common" / "v1" / "common_pb2.py").exists():
    raise RuntimeError("generated protos are missing: run `make proto` (or `make test`, which does it)")


# A green run means every collected test ran: a skip (a missing tool, a missing device) fails it.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped:
        terminalreporter.section("skipped tests fail the run")
        for line in _skipped:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
