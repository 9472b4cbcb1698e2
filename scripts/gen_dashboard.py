"""Write deploy/grafana/infermesh.json, the Grafana dashboard of the mesh, from the panel list
below (one place to edit; a unit test checks the file is current and every query parses)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "deploy" / "grafana" / "infermesh.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# (row title, [(panel title, unit, [(expr, legend)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    (
        "Golden signals per service",
        [
            ("Requests/s", "reqps", [("job:grpc_server_requests:rate5m", "{{job}}")]),
            (
                "Error ratio (server-side codes)",
                "percentunit",
                [("job:grpc_server_errors:ratio_rate5m", "{{job}}")],
            ),
            (
                "Unary latency p99",
                "s",
                [("job_method:grpc_server_handling_seconds:p99_5m", "{{job}} {{grpc_method}}")],
            ),
            (
                "Saturation: running / waiting sequences",
                "short",
                [
                    ("sum by (job, instance) (infermesh_running_sequences)", "running {{job}} {{instance}}"),
                    ("sum by (job, instance) (infermesh_waiting_sequences)", "waiting {{job}} {{instance}}"),
                ],
            ),
        ],
    ),
    (
        "Generation",
        [
            (
                "Time to first token",
                "s",
                [
                    (
                        "model_priority:infermesh_router_time_to_first_token_seconds:p99_5m",
                        "p99 {{model}} {{priority}}",
                    ),
                    (
                        "model_priority:infermesh_router_time_to_first_token_seconds:p50_5m",
                        "p50 {{model}} {{priority}}",
                    ),
                ],
            ),
            (
                "Time per output token p99",
                "s",
                [
                    (
                        "model_priority:infermesh_router_time_per_output_token_seconds:p99_5m",
                        "{{model}} {{priority}}",
                    )
                ],
            ),
            (
                "End-to-end latency p99",
                "s",
                [
                    (
                        "histogram_quantile(0.99, sum by (model, le) "
                        "(rate(infermesh_router_request_duration_seconds_bucket[5m])))",
                        "{{model}}",
                    )
                ],
            ),
            (
                "Tokens/s by tenant",
                "short",
                [
                    (
                        "sum by (tenant, direction) (tenant_model_direction:infermesh_router_tokens:rate5m)",
                        "{{tenant}} {{direction}}",
                    )
                ],
            ),
            (
                "Decode speed per endpoint",
                "short",
                [('infermesh_throughput_tokens_per_second{phase="decode"}', "{{instance}} {{model}}")],
            ),
        ],
    ),
    (
        "Admission queue",
        [
            (
                "Queue depth by priority",
                "short",
                [("sum by (priority) (infermesh_router_queue_depth)", "{{priority}}")],
            ),
            (
                "Queue wait p99 by priority",
                "s",
                [("priority:infermesh_router_queue_wait_seconds:p99_5m", "{{priority}}")],
            ),
            (
                "Streams in flight per router",
                "short",
                [("infermesh_router_inflight_requests", "{{instance}}")],
            ),
            ("Usable endpoints", "short", [("sum by (kind) (infermesh_router_endpoint_usable)", "{{kind}}")]),
        ],
    ),
    (
        "KV cache and caches",
        [
            (
                "KV cache used",
                "percentunit",
                [("instance_model:infermesh_kv_cache_blocks:used_ratio", "{{instance}} {{model}}")],
            ),
            (
                "KV blocks",
                "short",
                [("sum by (instance, state) (infermesh_kv_cache_blocks)", "{{instance}} {{state}}")],
            ),
            (
                "Prefix cache hit ratio",
                "percentunit",
                [("infermesh_prefix_cache_hit_ratio", "{{job}} {{instance}}")],
            ),
            (
                "Session window cache hit ratio",
                "percentunit",
                [("infermesh_session_window_cache:hit_ratio_rate5m", "hit ratio")],
            ),
            (
                "Embedder batch size",
                "short",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(infermesh_embedder_batch_size_bucket[5m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(infermesh_embedder_batch_size_bucket[5m])))",
                        "p99",
                    ),
                ],
            ),
        ],
    ),
    (
        "Degradation, refusals and failovers",
        [
            (
                "Degradation steps/s",
                "short",
                [("sum by (step) (rate(infermesh_router_requests_degraded_total[5m]))", "{{step}}")],
            ),
            (
                "Refused and shed/s",
                "short",
                [
                    (
                        "sum by (reason) (rate(infermesh_router_requests_refused_total[5m]))",
                        "refused {{reason}}",
                    ),
                    (
                        "sum by (priority) (rate(infermesh_router_requests_shed_total[5m]))",
                        "shed {{priority}}",
                    ),
                ],
            ),
            (
                "Failovers/s",
                "short",
                [
                    (
                        "sum by (kind, reason) (rate(infermesh_router_failovers_total[5m]))",
                        "{{kind}} {{reason}}",
                    )
                ],
            ),
            (
                "Guardrail hits/s",
                "short",
                [
                    (
                        "sum by (check, action) (rate(infermesh_router_guardrail_hits_total[5m]))",
                        "{{check}} {{action}}",
                    )
                ],
            ),
            (
                "Session backend errors/s",
                "short",
                [
                    (
                        "sum by (backend, error) (rate(infermesh_session_backend_errors_total[5m]))",
                        "{{backend}} {{error}}",
                    )
                ],
            ),
        ],
    ),
]


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "id": next_id,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        next_id += 1
        y += 1
        width = 24 // len(row_panels)
        for i, (title, unit, queries) in enumerate(row_panels):
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": next_id,
                    "datasource": DS,
                    "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + n)}
                        for n, (expr, legend) in enumerate(queries)
                    ],
                }
            )
            next_id += 1
        y += 8
    return {
        "title": "infermesh",
        "uid": "infermesh-overview",
        "description": "Golden signals per service, generation latency, admission queue, KV usage, "
        "degradation and failovers. Needs the recording rules in deploy/prometheus/rules.yml.",
        "tags": ["infermesh"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def queries() -> list[str]:
    return [expr for _, row in ROWS for _, _, targets in row for expr, _ in targets]


if __name__ == "__main__":
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
