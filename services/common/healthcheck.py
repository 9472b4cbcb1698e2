"""`python -m services.common.healthcheck [HOST:PORT]`: exit 0 when the server's gRPC health
says SERVING, 1 otherwise. For container health checks and Kubernetes exec probes, where the
image has Python but no grpc_health_probe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, ca: str | None, cert: str | None, key: str | None) -> grpc.Channel:
    if not ca:
        return grpc.insecure_channel(address)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.secure_channel(address, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> tuple[bool, str]:
    """(serving, what was seen). With `ca`, over TLS (`cert` and `key` for mutual TLS)."""
    with _channel(address, ca, cert, key) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck")
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:50051", help="host:port (default %(default)s)"
    )
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) of the server's: check over TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM), when the server wants one")
    parser.add_argument("--tls-key", help="private key of --tls-cert")
    args = parser.parse_args(argv)
    serving, seen = check(
        args.address, args.service, args.timeout, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key
    )
    print(f"{args.address}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
