"""`python -m services.launcher up|down|status`: the mesh as local processes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.launcher.mesh import SERVICES, Mesh, MeshSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=".run", help="pid files, logs and the SQLite database")
    parser.add_argument("--base-port", type=int, default=50051, help="router port; the others follow it")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    parser.add_argument(
        "--metrics-base-port",
        type=int,
        default=9451,
        help="router's Prometheus /metrics port; session, worker, embedder follow it (0 = none)",
    )
    args = parser.parse_args(argv)

    base = args.base_port
    spec = MeshSpec(
        state_dir=Path(args.state_dir).resolve(),
        router_port=base,
        session_port=base + 1,
        worker_port=base + 2,
        embedder_port=base + 3,
        metrics_ports=(
            {s: args.metrics_base_port + i for i, s in enumerate(("router", "session", "worker", "embedder"))}
            if args.metrics_base_port
            else {}
        ),
    )
    mesh = Mesh(spec)

    if args.command == "down":
        outcome = mesh.stop()
        if not outcome:
            print("nothing was running")
        for service, how in outcome.items():
            print(f"{service}: {how}")
        return 0
    if args.command == "status":
        running = mesh.running()
        for service in SERVICES:
            state = f"running (pid {running[service]})" if service in running else "stopped"
            print(f"{service:9} {spec.address(service):22} {state}")
        return 0

    print(f"starting infermesh ({', '.join(SERVICES)}); logs in {mesh.log_dir}", flush=True)
    mesh.start()
    try:
        asyncio.run(mesh.wait_ready(args.timeout))
    except (TimeoutError, RuntimeError) as exc:
        print(f"infermesh did not come up: {exc}", file=sys.stderr)
        mesh.stop()
        return 1
    print(f"infermesh is up: router at {spec.address('router')}")
    if spec.metrics_ports:
        ports = ", ".join(f"{s} {spec.host}:{p}" for s, p in spec.metrics_ports.items())
        print(f"Prometheus /metrics: {ports}")
        print(f"live view: infermesh top --metrics {spec.host}:{spec.metrics_ports['router']}")
    print('try: infermesh chat "Name the capital of France."   (stop with: make down)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
