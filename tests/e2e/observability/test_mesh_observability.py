"""Observability of the whole mesh as separate processes: one Generate is one trace across
router, session and worker (spans exported over OTLP to a collector in this test), every
service serves Prometheus metrics that promtool accepts and a real Prometheus scrapes."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.launcher.mesh import SERVICES, Mesh, MeshSpec
from tests.e2e.meshes import free_port, router_stub, running_mesh
from tests.fixtures.tools import system_tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        Span(
                            attributes.get("service.name", ""),
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    server = grpc.aio.server()
    servicer = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, str]) -> Iterator[Mesh]:
    spec = MeshSpec(
        state_dir=tmp_path_factory.mktemp("observed-mesh"),
        router_port=free_port(),
        session_port=free_port(),
        worker_port=free_port(),
        embedder_port=free_port(),
        metrics_ports={service: free_port() for service in SERVICES},
        extra_env={
            **{f"INFERMESH_{s.upper()}_OTLP_ENDPOINT": collector[1] for s in SERVICES},
            # Export within a fraction of a second rather than the default 5 s.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            # A quota (counted in the router) so the quota step shows in the trace.
            "INFERMESH_ROUTER_QUOTA_TOKENS_PER_MINUTE": "1000000",
        },
    )
    with running_mesh(spec) as m:
        yield m


@pytest.fixture(scope="module")
async def stub(mesh: Mesh) -> AsyncIterator[router_pb2_grpc.InferenceStub]:
    async with router_stub(mesh) as stub:
        yield stub


@pytest.fixture(scope="module")
async def traffic(stub: router_pb2_grpc.InferenceStub) -> tuple[str, str, str]:
    """One traced Generate with session history and one traced Embed, each continuing a trace
    the caller started; returns the caller's (Generate trace id, its span id, Embed trace id)."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="obs-user"), timeout=10)
    request = router_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say hello.")],
        session_id=session.session_id,
        max_tokens=8,
    )
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    chunks = [c async for c in stub.Generate(request, metadata=metadata, timeout=120)]
    assert chunks[-1].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    embed_trace = secrets.token_hex(16)
    embed_metadata = (("traceparent", f"00-{embed_trace}-{secrets.token_hex(8)}-01"),)
    await stub.Embed(router_pb2.EmbedRequest(inputs=["hello", "world"]), metadata=embed_metadata, timeout=30)
    return trace_id, parent_id, embed_trace


async def _spans_of(collector: Collector, trace_id: str, names: set[str], timeout: float) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in collector.spans if s.trace_id == trace_id]
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.2)


ROUTER_GENERATE = "/infermesh.router.v1.Inference/Generate"
WORKER_GENERATE = "/infermesh.worker.v1.Worker/Generate"
SESSION_WINDOW = "/infermesh.session.v1.SessionStore/GetWindow"
SESSION_APPEND = "/infermesh.session.v1.SessionStore/AppendMessages"


async def test_one_generate_is_one_trace_across_processes(
    collector: tuple[Collector, str], traffic: tuple[str, str, str]
) -> None:
    trace_id, caller_span, _ = traffic
    expected = {
        ROUTER_GENERATE,
        "auth",
        "quota",
        "placement",
        "session read",
        "session append",
        WORKER_GENERATE,
        "worker prefill",
        "worker decode",
        # The session service's own server spans: each process exports on its own schedule, so
        # waiting for the router's steps alone can read the trace before the session's arrive.
        SESSION_WINDOW,
        SESSION_APPEND,
    }
    spans = await _spans_of(collector[0], trace_id, expected, timeout=30)
    names = {s.name for s in spans}
    assert expected <= names, f"missing spans: {expected - names}"
    assert {s.service for s in spans} == {"infermesh-router", "infermesh-session", "infermesh-worker"}

    def one(name: str) -> Span:
        found = [s for s in spans if s.name == name]
        assert len(found) == 1, f"{name}: {len(found)} spans"
        return found[0]

    def nested(child: Span, parent: Span) -> None:
        assert child.parent_id == parent.span_id, f"{child.name} is not a child of {parent.name}"
        # One machine, one clock: a child starts within its parent and, in the same process,
        # ends within it. A callee's server span may close a moment after the caller's: the
        # caller answers its own client first and the finished stream is torn down after.
        slack_ns = 0 if child.service == parent.service else 2_000_000_000
        assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns + slack_ns, child.name

    router = one(ROUTER_GENERATE)
    assert router.service == "infermesh-router"
    assert router.parent_id == caller_span, "the router did not continue the caller's traceparent"
    for step in ("auth", "quota", "placement", "session read", "session append"):
        nested(one(step), router)
    worker = one(WORKER_GENERATE)
    assert worker.service == "infermesh-worker"
    nested(worker, router)
    prefill, decode = one("worker prefill"), one("worker decode")
    nested(prefill, worker)
    nested(decode, worker)
    assert prefill.end_ns <= decode.start_ns
    session_calls = [s for s in spans if s.service == "infermesh-session"]
    parents = {s.parent_id for s in session_calls}
    assert parents == {one("session read").span_id, one("session append").span_id}
    for call in session_calls:
        nested(
            call,
            one("session read") if call.parent_id == one("session read").span_id else one("session append"),
        )


async def test_router_log_line_of_the_request_carries_trace_request_and_tenant(
    mesh: Mesh, traffic: tuple[str, str, str]
) -> None:
    trace_id, _, _ = traffic
    lines = (mesh.log_dir / "router.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    finished = [r for r in records if r.get("trace_id") == trace_id and r["message"] == "generate finished"]
    assert len(finished) == 1, "no log line of the traced Generate"
    record = finished[0]
    assert record["request_id"] and record["tenant"] and record["service"] == "router"
    assert record["completion_tokens"] > 0


async def test_an_embed_is_one_trace_from_router_to_embedder(
    collector: tuple[Collector, str], traffic: tuple[str, str, str]
) -> None:
    _, _, trace_id = traffic
    router_embed, embedder_embed = (
        "/infermesh.router.v1.Inference/Embed",
        "/infermesh.embedder.v1.Embedder/Embed",
    )
    spans = await _spans_of(collector[0], trace_id, {router_embed, embedder_embed}, timeout=30)
    by_name = {s.name: s for s in spans}
    assert {router_embed, embedder_embed} <= set(by_name), sorted(by_name)
    assert by_name[embedder_embed].service == "infermesh-embedder"
    placement = by_name["placement"]
    assert placement.parent_id == by_name[router_embed].span_id
    assert by_name[embedder_embed].parent_id == by_name[router_embed].span_id


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


EXPECTED_SERIES = {
    "router": [
        "infermesh_router_time_to_first_token_seconds_bucket",
        "infermesh_router_time_per_output_token_seconds_bucket",
        "infermesh_router_request_duration_seconds_bucket",
        "infermesh_router_tokens_total",
        "infermesh_router_queue_depth",
        "infermesh_router_queue_wait_seconds_bucket",
        "infermesh_router_endpoint_usable",
        "grpc_server_handled_total",
    ],
    "session": ["infermesh_session_window_cache_events_total", "grpc_server_handling_seconds_bucket"],
    "worker": [
        "infermesh_running_sequences",
        "infermesh_waiting_sequences",
        "infermesh_kv_cache_blocks",
        "infermesh_prefix_cache_hit_ratio",
        "infermesh_throughput_tokens_per_second",
        "grpc_server_handled_total",
    ],
    "embedder": ["infermesh_embedder_batch_size_bucket", "infermesh_running_sequences"],
}


async def test_metrics_endpoints_pass_promtool(mesh: Mesh, traffic: tuple[str, str, str]) -> None:
    promtool = system_tool("promtool")
    for service in SERVICES:
        body = await asyncio.to_thread(_scrape, mesh.spec.metrics_ports[service])
        for series in EXPECTED_SERIES[service]:
            assert f"\n{series}" in body, f"{service}: {series} missing"
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
            f"{service}: {checked.stdout}{checked.stderr}"
        )


def _sample(body: str, name: str) -> float:
    line = next(x for x in body.splitlines() if x.startswith(f"{name} "))
    return float(line.split()[1])


async def test_every_service_serves_with_its_startup_heap_frozen(
    mesh: Mesh, traffic: tuple[str, str, str]
) -> None:
    """A full cycle collection over a worker's startup heap (torch, transformers, the model)
    stood its engine still for 90-170 ms mid-stream; frozen, those objects are walked no more."""
    frozen = {}
    for service in SERVICES:
        body = await asyncio.to_thread(_scrape, mesh.spec.metrics_ports[service])
        frozen[service] = _sample(body, "infermesh_gc_frozen_objects")
        assert "infermesh_gc_pause_seconds_bucket" in body, service
    # Every service froze something; the ones holding torch froze what a collection took so long over.
    assert all(count > 10_000 for count in frozen.values()), frozen
    assert frozen["worker"] > 200_000, frozen


def test_promtool_accepts_the_rules() -> None:
    promtool = system_tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_prometheus_scrapes_the_mesh(mesh: Mesh, traffic: tuple[str, str, str], tmp_path: Path) -> None:
    prometheus = system_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    scrape = [
        {
            "job_name": service,
            "static_configs": [{"targets": [f"127.0.0.1:{mesh.spec.metrics_ports[service]}"]}],
        }
        for service in SERVICES
    ]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": scrape,
            }
        )
    )
    proc = _start_prometheus(prometheus, config, tmp_path, port)
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        queries = {
            f'{series}{{job="{service}"}}' for service, names in EXPECTED_SERIES.items() for series in names
        } | {
            'up{job="router"} == 1',
            'up{job="worker"} == 1',
            'up{job="session"} == 1',
            'up{job="embedder"} == 1',
            "job:grpc_server_requests:rate5m",
            "model_priority:infermesh_router_time_to_first_token_seconds:p99_5m",
        }
        missing = await _wait_for_series(api, queries, timeout=60, proc=proc)
        assert not missing, (
            f"Prometheus has no samples for: {sorted(missing)}; log: "
            + (tmp_path / "prometheus.log").read_text()[-2000:]
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_for_series(
    api: str, queries: set[str], timeout: float, proc: subprocess.Popen[bytes]
) -> set[str]:
    deadline = time.monotonic() + timeout
    missing = set(queries)
    while missing and time.monotonic() < deadline:
        assert proc.poll() is None, "prometheus exited"
        for query in sorted(missing):
            if await asyncio.to_thread(_has_samples, api, query):
                missing.discard(query)
        await asyncio.sleep(1)
    return missing


def _has_samples(api: str, query: str) -> bool:
    url = f"{api}/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.load(resp)
    except (urllib.error.URLError, ConnectionError):
        return False
    return answer.get("status") == "success" and bool(answer["data"]["result"])


def _start_prometheus(binary: str, config: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    with open(workdir / "prometheus.log", "wb") as log:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
