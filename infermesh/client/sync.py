"""Blocking client of the router, for scripts and threaded services."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.client import calls, convert
from infermesh.client import types as t
from infermesh.client.channel import DEFAULT_ADDRESS, ChannelSettings, RetryPolicy, sync_channel
from infermesh.client.errors import from_rpc_error
from infermesh.router.v1 import router_pb2_grpc


class Client:
    """`with Client("router:50051", api_key=...) as client: client.generate("Hi!")`.

    `timeout` is the deadline (seconds) of each call unless the call names its own; None
    means no deadline. Calls that fail UNAVAILABLE are retried by gRPC per `retry`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        retry: RetryPolicy | None = None,
        settings: ChannelSettings | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.settings = settings or ChannelSettings(address, api_key, retry or RetryPolicy())
        self.timeout = timeout
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else sync_channel(self.settings)
        self._stubs = {
            "Inference": router_pb2_grpc.InferenceStub(self.channel),
            "Admin": router_pb2_grpc.AdminStub(self.channel),
        }
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        # The API key travels through the channel's interceptor (see sync_channel).
        return {"timeout": self.timeout if timeout is None else timeout}

    def _unary(self, call: calls.Call, timeout: float | None) -> Any:
        method = getattr(self._stubs[call.service], call.method)
        try:
            return call.read(method(call.request, **self._kwargs(timeout)))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.address) from None

    def _stream(self, call: calls.Call, timeout: float | None) -> Iterator[Any]:
        method = getattr(self._stubs[call.service], call.method)
        responses = method(call.request, **self._kwargs(timeout))
        try:
            for response in responses:
                yield call.read(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.address) from None
        finally:
            responses.cancel()

    # --- generation ---------------------------------------------------------------------------

    def stream(
        self,
        messages: Sequence[t.MessageLike] | str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[t.GenerateOptions],
    ) -> Iterator[t.Chunk]:
        """The reply as it is produced; leaving the loop early cancels the generation.

        `messages` is the conversation (a str is one user message); `options` are those of
        `GenerateOptions` (prompt, model, max_tokens, temperature, seed, stop, priority,
        session_id, deadline, ...).
        """
        return self._stream(calls.generate(messages, **options), timeout)

    def generate(
        self,
        messages: Sequence[t.MessageLike] | str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[t.GenerateOptions],
    ) -> t.Completion:
        """The whole reply (same arguments as `stream`)."""
        builder = convert.CompletionBuilder()
        for chunk in self.stream(messages, timeout=timeout, **options):
            builder.add(chunk)
        return builder.build()

    def embed(
        self,
        texts: Sequence[str] | str,
        *,
        model: str = "",
        normalize: bool | None = None,
        truncate: bool | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> t.Embeddings:
        return self._unary(calls.embed(texts, model, normalize, truncate, request_id), timeout)  # type: ignore[no-any-return]

    # --- sessions -----------------------------------------------------------------------------

    def create_session(
        self,
        user_id: str,
        *,
        model: str = "",
        metadata: Mapping[str, str] | None = None,
        retention_days: int = 0,
        timeout: float | None = None,
    ) -> t.Session:
        return self._unary(calls.create_session(user_id, model, metadata, retention_days), timeout)  # type: ignore[no-any-return]

    def get_session(self, session_id: str, *, timeout: float | None = None) -> t.Session:
        return self._unary(calls.get_session(session_id), timeout)  # type: ignore[no-any-return]

    def history(self, session_id: str, *, timeout: float | None = None) -> list[t.HistoryMessage]:
        """Every message of the session, oldest first (all pages)."""
        out: list[t.HistoryMessage] = []
        after = 0
        while True:
            page = self._unary(calls.history(session_id, after), timeout)
            out.extend(convert.history_from_pb(page))
            if not page.has_more or not page.messages:
                return out
            after = page.messages[-1].seq

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        self._unary(calls.delete_session(session_id), timeout)

    # --- catalog, status, admin ---------------------------------------------------------------

    def health(self, *, timeout: float | None = None) -> str:
        """The router's gRPC health: SERVING, NOT_SERVING (e.g. draining), ..."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=self._kwargs(timeout)["timeout"]
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.address) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def list_models(self, *, timeout: float | None = None) -> t.Models:
        return self._unary(calls.list_models(), timeout)  # type: ignore[no-any-return]

    def cluster_status(self, *, timeout: float | None = None) -> t.ClusterStatus:
        return self._unary(calls.cluster_status(), timeout)  # type: ignore[no-any-return]

    def drain(self, address: str, *, timeout: float | None = None) -> None:
        """Stop routing new requests to the endpoint at `address` (admin)."""
        self._unary(calls.drain(address), timeout)

    # --- batch jobs ---------------------------------------------------------------------------

    def submit_batch(
        self, items: Iterable[t.BatchItem], *, display_name: str = "", timeout: float | None = None
    ) -> t.BatchJob:
        return self._unary(calls.submit_batch(items, display_name), timeout)  # type: ignore[no-any-return]

    def get_batch(self, batch_id: str, *, timeout: float | None = None) -> t.BatchJob:
        return self._unary(calls.get_batch(batch_id), timeout)  # type: ignore[no-any-return]

    def list_batches(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> tuple[list[t.BatchJob], str]:
        """One page of this tenant's jobs, newest first, and the token of the next page."""
        return self._unary(calls.list_batches(page_size, page_token), timeout)  # type: ignore[no-any-return]

    def batch_results(self, batch_id: str, *, timeout: float | None = None) -> Iterator[t.BatchResult]:
        """Results of the items finished so far, in item order."""
        return self._stream(calls.batch_results(batch_id), timeout)

    def cancel_batch(self, batch_id: str, *, timeout: float | None = None) -> t.BatchJob:
        return self._unary(calls.cancel_batch(batch_id), timeout)  # type: ignore[no-any-return]
