"""asyncio client of the router, for services built on asyncio (same calls as `Client`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.client import calls, convert
from infermesh.client import types as t
from infermesh.client.channel import DEFAULT_ADDRESS, ChannelSettings, RetryPolicy, aio_channel
from infermesh.client.errors import from_rpc_error
from infermesh.router.v1 import router_pb2_grpc


class AsyncClient:
    """`async with AsyncClient("router:50051") as client: await client.generate("Hi!")`.

    Create it inside the event loop that uses it. `timeout` and `retry` as for `Client`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        retry: RetryPolicy | None = None,
        settings: ChannelSettings | None = None,
    ) -> None:
        self.settings = settings or ChannelSettings(address, api_key, retry or RetryPolicy())
        self.timeout = timeout
        self.channel = aio_channel(self.settings)
        self._stubs = {
            "Inference": router_pb2_grpc.InferenceStub(self.channel),
            "Admin": router_pb2_grpc.AdminStub(self.channel),
        }
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self.settings.metadata()}

    async def _unary(self, call: calls.Call, timeout: float | None) -> Any:
        method = getattr(self._stubs[call.service], call.method)
        try:
            return call.read(await method(call.request, **self._kwargs(timeout)))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.address) from None

    async def _stream(self, call: calls.Call, timeout: float | None) -> AsyncIterator[Any]:
        method = getattr(self._stubs[call.service], call.method)
        responses = method(call.request, **self._kwargs(timeout))
        try:
            async for response in responses:
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
    ) -> AsyncIterator[t.Chunk]:
        """The reply as it is produced (`async for`); see `Client.stream`."""
        return self._stream(calls.generate(messages, **options), timeout)

    async def generate(
        self,
        messages: Sequence[t.MessageLike] | str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[t.GenerateOptions],
    ) -> t.Completion:
        builder = convert.CompletionBuilder()
        async for chunk in self.stream(messages, timeout=timeout, **options):
            builder.add(chunk)
        return builder.build()

    async def embed(
        self,
        texts: Sequence[str] | str,
        *,
        model: str = "",
        normalize: bool | None = None,
        truncate: bool | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> t.Embeddings:
        return await self._unary(calls.embed(texts, model, normalize, truncate, request_id), timeout)  # type: ignore[no-any-return]

    # --- sessions -----------------------------------------------------------------------------

    async def create_session(
        self,
        user_id: str,
        *,
        model: str = "",
        metadata: Mapping[str, str] | None = None,
        retention_days: int = 0,
        timeout: float | None = None,
    ) -> t.Session:
        call = calls.create_session(user_id, model, metadata, retention_days)
        return await self._unary(call, timeout)  # type: ignore[no-any-return]

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> t.Session:
        return await self._unary(calls.get_session(session_id), timeout)  # type: ignore[no-any-return]

    async def history(self, session_id: str, *, timeout: float | None = None) -> list[t.HistoryMessage]:
        out: list[t.HistoryMessage] = []
        after = 0
        while True:
            page = await self._unary(calls.history(session_id, after), timeout)
            out.extend(convert.history_from_pb(page))
            if not page.has_more or not page.messages:
                return out
            after = page.messages[-1].seq

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        await self._unary(calls.delete_session(session_id), timeout)

    # --- catalog, status, admin ---------------------------------------------------------------

    async def health(self, *, timeout: float | None = None) -> str:
        """The router's gRPC health: SERVING, NOT_SERVING (e.g. draining), ..."""
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=self._kwargs(timeout)["timeout"]
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.settings.address) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def list_models(self, *, timeout: float | None = None) -> t.Models:
        return await self._unary(calls.list_models(), timeout)  # type: ignore[no-any-return]

    async def cluster_status(self, *, timeout: float | None = None) -> t.ClusterStatus:
        return await self._unary(calls.cluster_status(), timeout)  # type: ignore[no-any-return]

    async def drain(self, address: str, *, timeout: float | None = None) -> None:
        await self._unary(calls.drain(address), timeout)

    # --- batch jobs ---------------------------------------------------------------------------

    async def submit_batch(
        self, items: Iterable[t.BatchItem], *, display_name: str = "", timeout: float | None = None
    ) -> t.BatchJob:
        return await self._unary(calls.submit_batch(items, display_name), timeout)  # type: ignore[no-any-return]

    async def get_batch(self, batch_id: str, *, timeout: float | None = None) -> t.BatchJob:
        return await self._unary(calls.get_batch(batch_id), timeout)  # type: ignore[no-any-return]

    async def list_batches(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> tuple[list[t.BatchJob], str]:
        return await self._unary(calls.list_batches(page_size, page_token), timeout)  # type: ignore[no-any-return]

    def batch_results(self, batch_id: str, *, timeout: float | None = None) -> AsyncIterator[t.BatchResult]:
        return self._stream(calls.batch_results(batch_id), timeout)

    async def cancel_batch(self, batch_id: str, *, timeout: float | None = None) -> t.BatchJob:
        return await self._unary(calls.cancel_batch(batch_id), timeout)  # type: ignore[no-any-return]
