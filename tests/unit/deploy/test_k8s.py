"""deploy/k8s: every overlay renders with `kubectl kustomize`, and the rendered objects carry
what the issue asks for, consistent with the code (commands, settings, ports)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.mesh_config import DEPLOY, env_names, load, service_of_command

K8S = DEPLOY / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/gpu"]
KINDS = ["router", "session", "worker", "embedder"]


def render(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is needed to render the manifests"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    """(overlay, {"Kind/name": object})."""
    objects = {f"{o['kind']}/{o['metadata']['name']}": o for o in render(request.param)}
    return request.param, objects


def of_kind(objects: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {key.split("/", 1)[1]: o for key, o in objects.items() if o["kind"] == kind}


def mesh_containers(objects: dict[str, dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """service kind -> (Deployment, its container) for the containers of our image."""
    out = {}
    for deployment in of_kind(objects, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        out[service_of_command(container["command"])] = (deployment, container)
    return out


def config_file(objects: dict[str, dict[str, Any]], tmp: Path) -> Path:
    (configmap,) = of_kind(objects, "ConfigMap").values()
    path = tmp / "infermesh.toml"
    path.write_text(configmap["data"]["infermesh.toml"])
    return path


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment; values from Secrets and the downward API as placeholders
    that the config accepts."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = "postgresql+asyncpg://u@postgres:5432/db" if "URL" in var["name"] else ""
        else:
            env[var["name"]] = "pod-name"
    return env


def test_every_service_runs_with_the_config_it_is_given(
    rendered: tuple[str, dict[str, dict[str, Any]]], tmp_path: Path
) -> None:
    _, objects = rendered
    containers = mesh_containers(objects)
    assert sorted(containers) == sorted(KINDS)
    path = config_file(objects, tmp_path)
    sections = tomllib.loads(path.read_text())
    assert sorted(sections) == sorted(KINDS)
    known = env_names()
    for kind, (deployment, container) in containers.items():
        env = plain_env(container)
        assert env.pop("INFERMESH_CONFIG") == "/etc/infermesh/infermesh.toml"
        assert not set(env) - known, f"{kind}: no service reads {sorted(set(env) - known)}"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/etc/infermesh"]]["configMap"]["name"] in of_kind(objects, "ConfigMap")
        config = load(kind, env, path)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}
        assert config.host == "0.0.0.0"
        # Health through gRPC health, on the service's own port.
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == config.port, f"{kind} {probe}"
        requests = container["resources"]["requests"]
        assert "cpu" in requests and "memory" in requests, f"{kind} has no resource requests"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # A locally built image (kind load, minikube image load) must not be pulled.
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_services_route_to_the_right_pods_and_ports(
    rendered: tuple[str, dict[str, dict[str, Any]]], tmp_path: Path
) -> None:
    _, objects = rendered
    containers = mesh_containers(objects)
    services = of_kind(objects, "Service")
    router_env = plain_env(containers["router"][1])
    router_env.pop("INFERMESH_CONFIG")
    router = load("router", router_env, config_file(objects, tmp_path))
    targets = {
        "worker": router.worker_addresses,
        "embedder": router.embedder_addresses,
        "session": [router.session_address],
    }
    for kind, addresses in targets.items():
        (address,) = addresses
        if kind != "session":
            # Resolved by the router to every pod behind the headless Service.
            assert address.startswith("dns:///"), f"{kind}: {address} names one address, not every pod"
        name, port = address.removeprefix("dns:///").rsplit(":", 1)
        service = services[name]
        labels = containers[kind][0]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), f"{name} selects no {kind} pod"
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == int(port)
    # Headless: the name resolves to every worker pod, not one virtual IP.
    assert services["infermesh-worker"]["spec"]["clusterIP"] == "None"
    assert services["infermesh-embedder"]["spec"]["clusterIP"] == "None"
    assert services["infermesh-router"]["spec"].get("clusterIP") != "None"


def test_disruption_budgets_and_autoscaling(rendered: tuple[str, dict[str, dict[str, Any]]]) -> None:
    overlay, objects = rendered
    containers = mesh_containers(objects)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for kind, (deployment, _) in containers.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [
            b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, f"{kind}: {len(covering)} PodDisruptionBudgets"
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == containers["router"][0]["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "overlays/dev":
        # Laptop clusters have no KEDA: the dev overlay leaves workers at one replica.
        assert not of_kind(objects, "ScaledObject")
        return
    (scaled,) = of_kind(objects, "ScaledObject").values()
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["name"] == containers["worker"][0]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # The metric the router exports for its admission queue, in this overlay's namespace.
    metrics_source = (DEPLOY.parent / "services" / "router" / "metrics.py").read_text()
    assert '"infermesh_router_queue_depth"' in metrics_source
    namespace = containers["worker"][0]["metadata"]["namespace"]
    assert trigger["metadata"]["query"] == f'sum(infermesh_router_queue_depth{{namespace="{namespace}"}})'


def test_databases_are_stateful_sets_with_their_services(
    rendered: tuple[str, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    sets = of_kind(objects, "StatefulSet")
    assert set(sets) == {"postgres", "redis"}
    assert sets["postgres"]["spec"]["volumeClaimTemplates"], "postgres keeps its data on a volume"
    services = of_kind(objects, "Service")
    for name in sets:
        assert name in services
    secret = next(iter(of_kind(objects, "Secret").values()))["data"]
    assert secret["database-url"], "the database URL Secret is set"
    # Session replicas share one key ring; without it each would make its own key and could
    # not read what another wrote.
    keys = base64.b64decode(secret["session-encryption-keys"]).decode()
    assert keys, "no session key ring"
    env = {"INFERMESH_SESSION_ENCRYPTION_KEYS": keys}
    assert load("session", env).encryption_keys == keys


def test_network_policies_admit_only_the_callers_of_each_service(
    rendered: tuple[str, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    policies = list(of_kind(objects, "NetworkPolicy").values())
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny, "a default deny of ingress"
    allowed: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for policy in policies:
        target = policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        for rule in policy["spec"].get("ingress", []):
            sources = [
                f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name", "*")
                for f in rule.get("from", [{}])
            ]
            for source in sources:
                for port in rule["ports"]:
                    allowed[target].add((source, port["port"]))
    assert allowed["infermesh-router"] == {("*", 50051)}
    assert allowed["infermesh-worker"] == {("infermesh-router", 50053)}
    assert allowed["infermesh-embedder"] == {("infermesh-router", 50054)}
    assert allowed["infermesh-session"] == {("infermesh-router", 50052)}
    assert ("infermesh-session", 5432) in allowed["postgres"]


def test_gpu_overlay_puts_workers_on_gpus_and_the_embedder_on_cpu_nodes() -> None:
    objects = {f"{o['kind']}/{o['metadata']['name']}": o for o in render("overlays/gpu")}
    containers = mesh_containers(objects)
    worker_deployment, worker = containers["worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = plain_env(worker)
    env.pop("INFERMESH_CONFIG")
    assert load("worker", env).device == "cuda"
    spec = worker_deployment["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    embedder_deployment, embedder = containers["embedder"]
    assert "nvidia.com/gpu" not in str(embedder["resources"])
    assert embedder_deployment["spec"]["template"]["spec"]["nodeSelector"] == {"infermesh.io/pool": "cpu"}
    # Base and dev workers stay on CPU.
    for path in ("base", "overlays/dev"):
        base = {f"{o['kind']}/{o['metadata']['name']}": o for o in render(path)}
        assert "nvidia.com/gpu" not in str(mesh_containers(base)["worker"][1])


def test_dev_overlay_is_one_of_everything_in_its_own_namespace() -> None:
    objects = render("overlays/dev")
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"infermesh-dev"}
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"] == ["infermesh-dev"]
    assert {o["spec"]["replicas"] for o in objects if o["kind"] == "Deployment"} == {1}
