"""TLS on every gRPC port and mutual TLS between services, switched on by config.

Each service has one certificate (`tls_cert_file` + `tls_key_file`): it serves with it and
presents it as its client certificate when it calls another service. `tls_ca_file` is the
mesh's CA: it verifies the servers a service calls and, with `tls_require_client_cert`, the
clients that call it (mTLS), and `tls_allowed_clients` names the services (certificate
common names) that may call it: the session service, workers and embedders answer only the
router. Empty files mean plaintext, as in the embedded default.
`make certs` writes a development CA and certificates (`python -m services.common.tls`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.config import ConfigError, setting


def cert_file_setting() -> Any:
    return setting(
        "", "PEM certificate this service serves with (and presents to services it calls); empty = plaintext."
    )


def key_file_setting() -> Any:
    return setting("", "PEM private key of tls_cert_file.")


def ca_file_setting() -> Any:
    return setting(
        "",
        "PEM CA certificate of the mesh: verifies the services this one calls and, with "
        "tls_require_client_cert, the clients calling it.",
    )


def require_client_cert_setting(default: bool) -> Any:
    return setting(default, "Refuse clients without a certificate signed by tls_ca_file (mutual TLS).")


def allowed_clients_setting() -> Any:
    return setting(
        ["router"],
        "With tls_require_client_cert: the common names of the client certificates that may call "
        "this service (each service has its own); empty = any certificate of tls_ca_file. Health "
        "checks and reflection answer any certificate of the mesh.",
    )


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = False
    allowed_clients: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: Any) -> TlsConfig:
        """From a service config's tls_* fields."""
        return cls(
            config.tls_cert_file,
            config.tls_key_file,
            config.tls_ca_file,
            config.tls_require_client_cert,
            tuple(getattr(config, "tls_allowed_clients", ())),
        )

    @property
    def checks_callers(self) -> bool:
        """Whether calls are refused by the caller's certificate name (mTLS with a list)."""
        return self.serving and self.require_client_cert and bool(self.allowed_clients)

    @property
    def serving(self) -> bool:
        return bool(self.cert_file)

    @property
    def calling(self) -> bool:
        return bool(self.ca_file)

    def check(self, service: str) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{service}.tls_cert_file and tls_key_file: set both or neither")
        if self.require_client_cert and self.cert_file and not self.ca_file:
            raise ConfigError(f"{service}.tls_require_client_cert=true: needs tls_ca_file to verify clients")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{service}.tls_{name}={path!r}: no such file")


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    if not tls.serving:
        return None
    pair = (Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())
    ca = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=tls.require_client_cert
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    if not tls.calling:
        return None
    key = Path(tls.key_file).read_bytes() if tls.key_file else None
    cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
    return grpc.ssl_channel_credentials(Path(tls.ca_file).read_bytes(), key, cert)


def aio_channel(address: str, tls: TlsConfig, **kwargs: Any) -> grpc.aio.Channel:
    """A channel to another service: TLS (with this service's certificate) when tls_ca_file is set."""
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(address, **kwargs)
    return grpc.aio.secure_channel(address, credentials, **kwargs)


# --- development certificates ------------------------------------------------------------------


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "infermesh dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(folder: Path, stem: str, cert: Any, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)


def make_ca(folder: Path, stem: str = "ca", days: int = 365) -> tuple[Any, Any]:
    """A self-signed CA; returns (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"infermesh {stem}"))
        .issuer_name(_name(f"infermesh {stem}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write(folder, stem, cert, key)
    return cert, key


def make_cert(
    folder: Path,
    stem: str,
    ca: tuple[Any, Any],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    days: int = 365,
    expired: bool = False,
) -> None:
    """A certificate signed by `ca` for server and client use, valid for `hosts` (DNS names or IPs).
    `expired`: valid from two days ago until yesterday, for tests."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
        if expired
        else (
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=days),
        )
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder, stem, cert, key)


SERVICES = ("router", "session", "worker", "embedder", "client")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.tls",
        description="write a development CA and a certificate per service",
    )
    parser.add_argument("--out", default=".run/certs", help="folder (default: %(default)s)")
    parser.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="comma-separated DNS names and IPs the certificates are for",
    )
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    out = Path(args.out)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    ca = make_ca(out, days=args.days)
    for name in SERVICES:
        make_cert(out, name, ca, hosts, days=args.days)
    print(f"wrote ca.crt and {', '.join(f'{s}.crt/.key' for s in SERVICES)} to {out}/ (development only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
