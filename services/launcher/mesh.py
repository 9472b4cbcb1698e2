"""Start, wait for and stop the four services as separate local processes.

The embedded default: session on SQLite, the packaged models, no containers.
Each process is `python -m services.<name>`, configured only through the
environment variables its typed config reads, so what runs here is what runs
in a container.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from services.common.server import wait_serving

# Start order matters only for readiness: the router waits for load reports anyway.
SERVICES = ("session", "worker", "embedder", "router")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    state_dir: Path
    host: str = "127.0.0.1"
    router_port: int = 50051
    session_port: int = 50052
    worker_port: int = 50053
    embedder_port: int = 50054
    log_level: str = "info"
    # Extra environment for every process (e.g. a database URL, a dtype).
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Prometheus /metrics port per service; a service left out serves none.
    metrics_ports: dict[str, int] = dataclasses.field(default_factory=dict)

    def port(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))

    def address(self, service: str) -> str:
        return f"{self.host}:{self.port(service)}"

    def env_for(self, service: str) -> dict[str, str]:
        prefix = f"INFERMESH_{service.upper()}_"
        env = {
            f"{prefix}HOST": self.host,
            f"{prefix}PORT": str(self.port(service)),
            f"{prefix}LOG_LEVEL": self.log_level,
        }
        if service in self.metrics_ports:
            env[f"{prefix}METRICS_PORT"] = str(self.metrics_ports[service])
        if service == "session":
            env[f"{prefix}STATE_DIR"] = str(self.state_dir)
        if service == "router":
            env[f"{prefix}WORKER_ADDRESSES"] = self.address("worker")
            env[f"{prefix}EMBEDDER_ADDRESSES"] = self.address("embedder")
            env[f"{prefix}SESSION_ADDRESS"] = self.address("session")
        return env


class Mesh:
    """The processes of one mesh; pid files under state_dir let `down` find them later."""

    def __init__(self, spec: MeshSpec) -> None:
        self.spec = spec
        self.state_dir = spec.state_dir
        self.log_dir = spec.state_dir / "logs"

    def pid_file(self, service: str) -> Path:
        return self.state_dir / f"{service}.pid"

    def running(self) -> dict[str, int]:
        """Services whose recorded process is still alive."""
        alive = {}
        for service in SERVICES:
            pid = _read_pid(self.pid_file(service))
            if pid is not None and _alive(pid):
                alive[service] = pid
        return alive

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        already = self.running()
        for service in SERVICES:
            if service in already:
                continue
            env = {**os.environ, **self.spec.env_for(service), **self.spec.extra_env}
            log = open(self.log_dir / f"{service}.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own process group: Ctrl-C in the terminal that ran `make up` doesn't kill the mesh.
                start_new_session=True,
            )
            log.close()
            self.pid_file(service).write_text(str(proc.pid))
        (self.state_dir / "mesh.json").write_text(
            json.dumps({s: self.spec.address(s) for s in SERVICES}, indent=2) + "\n"
        )

    async def wait_ready(self, timeout: float = 300.0) -> None:
        """Every service SERVING and the router seeing a healthy worker and embedder."""
        deadline = time.monotonic() + timeout
        for service in SERVICES:
            remaining = deadline - time.monotonic()
            try:
                await wait_serving(self.spec.address(service), max(remaining, 1.0))
            except TimeoutError as exc:
                self._raise_if_died(service)
                raise TimeoutError(f"{service}: {exc}; see {self.log_dir / (service + '.log')}") from None
            self._raise_if_died(service)
        await self._wait_router_sees_endpoints(deadline)

    async def _wait_router_sees_endpoints(self, deadline: float) -> None:
        from infermesh.router.v1 import router_pb2, router_pb2_grpc

        async with grpc.aio.insecure_channel(self.spec.address("router")) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            kinds: set[int] = set()
            while time.monotonic() < deadline:
                status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
                kinds = {e.kind for e in status.endpoints if e.healthy}
                if {router_pb2.ENDPOINT_KIND_WORKER, router_pb2.ENDPOINT_KIND_EMBEDDER} <= kinds:
                    return
                await asyncio.sleep(0.2)
        raise TimeoutError("router did not see a healthy worker and embedder in time")

    def _raise_if_died(self, service: str) -> None:
        pid = _read_pid(self.pid_file(service))
        if pid is None or not _alive(pid):
            tail = _tail(self.log_dir / f"{service}.log")
            raise RuntimeError(f"{service} exited during start; last log lines:\n{tail}")

    def stop(self, grace: float = 15.0) -> dict[str, str]:
        """SIGTERM (graceful drain), then SIGKILL what is left after `grace` seconds.

        Returns how each running service ended: "terminated" or "killed".
        """
        outcome = {}
        procs = self.running()
        for pid in procs.values():
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_alive(p) for p in procs.values()):
            time.sleep(0.1)
        for service, pid in procs.items():
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
                outcome[service] = "killed"
            else:
                outcome[service] = "terminated"
        for service in SERVICES:
            self.pid_file(service).unlink(missing_ok=True)
        return outcome


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
