"""Every call of the public API as a plain description (which RPC, which request, how to read
the answer), so the sync and asyncio clients share everything but the waiting."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infermesh.client import convert
from infermesh.client import types as t
from infermesh.router.v1 import router_pb2


@dataclass(frozen=True)
class Call:
    service: str  # "Inference" or "Admin"
    method: str
    request: Any
    read: Callable[[Any], Any]


def _same(x: Any) -> Any:
    return x


def embed(
    texts: Sequence[str] | str,
    model: str = "",
    normalize: bool | None = None,
    truncate: bool | None = None,
    request_id: str = "",
) -> Call:
    inputs = [texts] if isinstance(texts, str) else list(texts)
    req = convert.embed_request(inputs, model, normalize, truncate, request_id)
    return Call("Inference", "Embed", req, convert.embeddings_from_pb)


def create_session(
    user_id: str, model: str = "", metadata: Mapping[str, str] | None = None, retention_days: int = 0
) -> Call:
    req = convert.create_session_request(user_id, model, metadata, retention_days)
    return Call("Inference", "CreateSession", req, convert.session_from_pb)


def get_session(session_id: str) -> Call:
    req = router_pb2.GetSessionRequest(session_id=session_id)
    return Call("Inference", "GetSession", req, convert.session_from_pb)


def history(session_id: str, after_seq: int = 0, page_size: int = 0) -> Call:
    req = router_pb2.GetHistoryRequest(session_id=session_id, after_seq=after_seq, page_size=page_size)
    return Call("Inference", "GetHistory", req, _same)


def delete_session(session_id: str) -> Call:
    req = router_pb2.DeleteSessionRequest(session_id=session_id)
    return Call("Inference", "DeleteSession", req, lambda _: None)


def list_models() -> Call:
    return Call("Inference", "ListModels", router_pb2.ListModelsRequest(), convert.models_from_pb)


def cluster_status() -> Call:
    req = router_pb2.GetClusterStatusRequest()
    return Call("Inference", "GetClusterStatus", req, convert.cluster_from_pb)


def submit_batch(items: Iterable[t.BatchItem], display_name: str = "") -> Call:
    req = convert.batch_request(items, display_name)
    return Call("Inference", "SubmitBatch", req, convert.batch_from_pb)


def get_batch(batch_id: str) -> Call:
    req = router_pb2.GetBatchRequest(batch_id=batch_id)
    return Call("Inference", "GetBatch", req, convert.batch_from_pb)


def list_batches(page_size: int = 0, page_token: str = "") -> Call:
    req = router_pb2.ListBatchesRequest(page_size=page_size, page_token=page_token)
    return Call(
        "Inference",
        "ListBatches",
        req,
        lambda r: ([convert.batch_from_pb(j) for j in r.jobs], r.next_page_token),
    )


def batch_results(batch_id: str) -> Call:
    req = router_pb2.GetBatchResultsRequest(batch_id=batch_id)
    return Call("Inference", "GetBatchResults", req, convert.batch_result_from_pb)


def cancel_batch(batch_id: str) -> Call:
    req = router_pb2.CancelBatchRequest(batch_id=batch_id)
    return Call("Inference", "CancelBatch", req, convert.batch_from_pb)


def drain(address: str) -> Call:
    req = router_pb2.DrainEndpointRequest(address=address)
    return Call("Admin", "DrainEndpoint", req, lambda _: None)


def generate(messages: Sequence[t.MessageLike] | str | None, **options: Any) -> Call:
    req = convert.generate_request(messages, **options)
    return Call("Inference", "Generate", req, convert.chunk_from_pb)
