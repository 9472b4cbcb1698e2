"""JSON log lines carry the current trace and span ids, the request id and the tenant."""

from __future__ import annotations

import json
import logging

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.common.logs import JsonFormatter, request_id_var, tenant_var
from services.common.telemetry import span, trace_ids, tracing_enabled


def _record() -> logging.LogRecord:
    return logging.LogRecord("svc", logging.INFO, __file__, 1, "done %s", ("x",), None)


def test_a_line_inside_a_span_names_its_trace_request_and_tenant() -> None:
    tracer = TracerProvider().get_tracer("test")  # a local provider: the global one stays no-op
    request_token, tenant_token = request_id_var.set("req-1"), tenant_var.set("acme")
    try:
        with tracer.start_as_current_span("step") as current:
            entry = json.loads(JsonFormatter("router").format(_record()))
            ctx = current.get_span_context()
    finally:
        request_id_var.reset(request_token)
        tenant_var.reset(tenant_token)
    assert entry["trace_id"] == format(ctx.trace_id, "032x")
    assert entry["span_id"] == format(ctx.span_id, "016x")
    assert (entry["request_id"], entry["tenant"], entry["service"]) == ("req-1", "acme", "router")
    assert entry["message"] == "done x"


def test_outside_a_trace_there_is_no_trace_id() -> None:
    entry = json.loads(JsonFormatter("worker").format(_record()))
    assert "trace_id" not in entry and "span_id" not in entry


def test_tracing_off_spans_are_no_ops() -> None:
    assert not tracing_enabled()
    with span("placement", model="m") as current:
        assert not current.get_span_context().is_valid
        assert trace_ids() == ("", "")
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)
