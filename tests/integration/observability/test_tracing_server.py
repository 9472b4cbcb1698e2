"""Tracing on a real GrpcServer (in a process of its own: a process has one tracer provider):
a span per RPC continuing the caller's traceparent, steps nested in it (the admission queue's
wait among them), and streaming handlers the instrumentation cannot wrap (coroutines using
context.write, health Watch) still served."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.observability.tracing_server import PARENT_ID, SERVICE, TRACE_ID

ROOT = Path(__file__).resolve().parents[3]


def test_server_spans_continue_the_callers_trace_and_nothing_breaks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.observability.tracing_server"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["generator"] == ["a", "b"]
    assert results["writer"] == ["w"]
    assert results["watch"] == "SERVING"
    spans = {s["name"]: s for s in results["spans"]}
    server = spans[f"/{SERVICE}/Generator"]
    assert (server["trace_id"], server["parent_id"]) == (TRACE_ID, PARENT_ID)
    inner = spans["inner step"]
    assert (inner["trace_id"], inner["parent_id"]) == (TRACE_ID, server["span_id"])
    # A request that waited for a slot has a queue wait span under its own.
    assert spans["queue wait"]["parent_id"] == spans["queued request"]["span_id"]
    # Health is not traced; the coroutine-style stream is served untraced.
    assert not any("Health" in name or name.endswith("/Writer") for name in spans)
