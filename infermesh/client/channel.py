"""How the clients talk to the router: channel options, gRPC's own retries, call metadata.

Retries are gRPC's (service config `retryPolicy`, gRFC A6), not a loop here: a call that
ends UNAVAILABLE before any response arrived is tried again with exponential backoff, and a
`grpc-retry-pushback-ms` trailer from the server replaces the backoff with the server's
delay. A streamed Generate is retried only until its first message reached the client.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

INFERENCE_SERVICE = "infermesh.router.v1.Inference"
ADMIN_SERVICE = "infermesh.router.v1.Admin"
API_KEY_METADATA = "authorization"
DEFAULT_ADDRESS = "127.0.0.1:50051"
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_METHODS = [{"service": INFERENCE_SERVICE}, {"service": ADMIN_SERVICE}]


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy for every call to the router."""

    max_attempts: int = 4  # gRPC caps this at 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    # RESOURCE_EXHAUSTED can be added to retry overload refusals after the router's pushback.
    retryable_codes: Sequence[str] = ("UNAVAILABLE",)
    # Retry throttling (per channel): retries stop while too many calls fail.
    throttle_max_tokens: int = 20
    throttle_token_ratio: float = 0.2

    def service_config(self) -> str:
        if self.max_attempts < 2:
            return json.dumps({"methodConfig": [{"name": _METHODS}]})
        retry = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_codes),
        }
        config = {
            "methodConfig": [{"name": _METHODS, "retryPolicy": retry}],
            "retryThrottling": {
                "maxTokens": self.throttle_max_tokens,
                "tokenRatio": self.throttle_token_ratio,
            },
        }
        return json.dumps(config)


NO_RETRIES = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ChannelSettings:
    """Everything a client needs to open its channel and decorate its calls."""

    address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Root certificates (PEM) for TLS; None with tls=False is a plaintext channel.
    tls: bool = False
    root_certificates: bytes | None = None
    # Client certificate and key (PEM) for mutual TLS.
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> ChannelSettings:
        """TLS from PEM files: `ca_file` verifies the router; `cert_file` and `key_file` are this
        client's certificate when the router asks for one (mutual TLS). No files: plaintext."""

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(
            address,
            api_key,
            retry or RetryPolicy(),
            tls=bool(ca_file or cert_file),
            root_certificates=read(ca_file),
            certificate_chain=read(cert_file),
            private_key=read(key_file),
        )

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 1 if self.retry.max_attempts > 1 else 0),
            ("grpc.service_config", self.retry.service_config()),
        ]
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((API_KEY_METADATA, f"Bearer {self.api_key}"),) if self.api_key else ()


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the API key to every call made on a blocking channel, whoever makes it."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def sync_channel(settings: ChannelSettings) -> grpc.Channel:
    """A blocking channel; every call on it carries the API key, if any."""
    credentials = settings.credentials()
    if credentials is None:
        channel = grpc.insecure_channel(settings.address, options=settings.options())
    else:
        channel = grpc.secure_channel(settings.address, credentials, options=settings.options())
    metadata = settings.metadata()
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel


def aio_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    credentials = settings.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(settings.address, options=settings.options())
    return grpc.aio.secure_channel(settings.address, credentials, options=settings.options())
