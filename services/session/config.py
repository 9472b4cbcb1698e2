"""Configuration of the session service."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import tls
from services.common.config import ConfigError, metrics_port_setting, otlp_endpoint_setting, setting
from services.session.crypto import KeyRing, KeyRingError


@dataclass(frozen=True)
class SessionConfig:
    host: str = setting("127.0.0.1", "Address the gRPC server binds.")
    port: int = setting(50052, "gRPC port; 0 picks a free one.", min=0, max=65535)
    log_level: str = setting("info", "Log level.", choices=["debug", "info", "warning", "error"])
    metrics_port: int = metrics_port_setting()
    otlp_endpoint: str = otlp_endpoint_setting()
    tls_cert_file: str = tls.cert_file_setting()
    tls_key_file: str = tls.key_file_setting()
    tls_ca_file: str = tls.ca_file_setting()
    tls_require_client_cert: bool = tls.require_client_cert_setting(True)
    tls_allowed_clients: list[str] = tls.allowed_clients_setting()
    grace_s: float = setting(10.0, "Seconds to finish in-flight calls on shutdown.", min=0, max=600)
    database_url: str = setting(
        "",
        "SQLAlchemy URL: postgresql+asyncpg://user:pass@host:port/db, or sqlite+aiosqlite:///file. "
        "Empty means a SQLite file under state_dir.",
    )
    state_dir: str = setting(".run", "Folder for the embedded SQLite database (created if missing).")
    auto_migrate: bool = setting(
        False,
        "Migrate a Postgres schema at start (replicas take turns). Off: run `make migrate` or "
        "`python -m services.session migrate` before rolling out. SQLite is always migrated at "
        "start: the process owns the file.",
    )
    max_message_chars: int = setting(100_000, "Longest message content accepted.", min=1, max=10_000_000)
    max_messages_per_append: int = setting(
        256, "Most messages in one AppendMessages call.", min=1, max=10_000
    )
    default_page_size: int = setting(100, "GetHistory page size when the request gives none.", min=1)
    max_page_size: int = setting(1000, "Largest GetHistory page size accepted.", min=1, max=100_000)
    pool_size: int = setting(
        10,
        "Database connections kept open; calls beyond them wait for one (at most db_timeout_s) rather "
        "than open and close connections under load.",
        min=1,
    )
    db_timeout_s: float = setting(
        5.0, "Bound on connecting, waiting for a pooled connection and each statement.", min=0.05, max=300
    )
    health_interval_s: float = setting(5.0, "How often the database is probed for health.", min=0.1, max=300)
    encryption_keys: str = setting(
        "",
        "Key ring for message content: comma-separated id:base64 entries of 32-byte AES keys, the "
        "first one sealing new data. Rotate by putting a new key first, then run rotate-keys. "
        "Empty: the key file under state_dir (created with a new key if missing).",
    )
    retention_interval_s: float = setting(
        3600.0, "How often sessions past their retention_days are purged; 0 turns purging off.", min=0
    )
    redis_url: str = setting(
        "",
        "Redis for the window cache (redis://host:port/db); empty keeps the cache in process "
        "(one replica only).",
    )
    redis_prefix: str = setting("infermesh:session", "Prefix of every Redis key the service writes.")
    redis_timeout_s: float = setting(
        0.25, "Bound on each Redis call; slower calls fall back to the database.", min=0.001, max=30
    )
    cache_retry_s: float = setting(
        1.0, "After a cache failure the cache is skipped this long.", min=0.0, max=300
    )
    cache_ttl_s: float = setting(300.0, "How long a cached window lives.", min=0.1, max=86_400)
    cache_max_sessions: int = setting(
        10_000,
        "Sessions whose windows the in-process cache keeps (least recently used dropped); 0 turns it off.",
        min=0,
    )

    def check(self) -> None:
        tls.TlsConfig.of(self).check("session")
        if self.default_page_size > self.max_page_size:
            raise ConfigError(
                f"session.default_page_size={self.default_page_size}: must be <= max_page_size "
                f"({self.max_page_size})"
            )
        if self.encryption_keys:
            try:
                KeyRing.parse(self.encryption_keys)
            except KeyRingError as exc:
                raise ConfigError(f"session.encryption_keys: {exc}") from None
        redis_scheme = self.redis_url.split("://", 1)[0]
        if self.redis_url and redis_scheme not in ("redis", "rediss", "unix"):
            # The scheme only: the URL may hold a password.
            raise ConfigError(f"session.redis_url scheme {redis_scheme!r}: must be redis, rediss or unix")
        if self.database_url:
            scheme = self.database_url.split("://", 1)[0]
            if scheme not in _ACCEPTED_SCHEMES:
                raise ConfigError(
                    f"session.database_url scheme {scheme!r}: must be one of {', '.join(_ACCEPTED_SCHEMES)}"
                )


_ACCEPTED_SCHEMES = ("postgresql+asyncpg", "postgresql", "postgres", "sqlite+aiosqlite", "sqlite")
