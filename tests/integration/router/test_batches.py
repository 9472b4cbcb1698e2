"""Batch jobs through a real router in front of fake workers: submit, progress, results in
order, cancellation, bad input, and a job taken over by another replica sharing the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import FakeWorker, start_fake
from tests.integration.router.helpers import (
    chat_request,
    collect,
    free_port,
    start_router,
    text_of,
    wait_healthy,
    wait_until,
)

DONE = {router_pb2.BATCH_STATE_SUCCEEDED, router_pb2.BATCH_STATE_FAILED, router_pb2.BATCH_STATE_CANCELLED}


def batch(*texts: str, **fields: Any) -> router_pb2.SubmitBatchRequest:
    items = [
        router_pb2.BatchItem(custom_id=f"q{i}", request=chat_request(text, request_id="", **fields))
        for i, text in enumerate(texts)
    ]
    return router_pb2.SubmitBatchRequest(items=items, display_name="test")


async def wait_state(stub: Any, batch_id: str, states: set[int], timeout: float = 10.0) -> Any:
    job: Any = None

    async def reached() -> bool:
        nonlocal job
        job = await stub.GetBatch(router_pb2.GetBatchRequest(batch_id=batch_id), timeout=5)
        return job.state in states

    await wait_until(reached, timeout, what=f"batch {batch_id} in {states}")
    return job


async def results(stub: Any, batch_id: str) -> list[Any]:
    return [r async for r in stub.GetBatchResults(router_pb2.GetBatchResultsRequest(batch_id=batch_id))]


def sample(name: str) -> float:
    """A batch counter of this process's router(s): job events, or item outcomes ("ok", codes)."""
    jobs = REGISTRY.get_sample_value("infermesh_router_batch_jobs_total", {"event": name})
    items = REGISTRY.get_sample_value("infermesh_router_batch_items_total", {"outcome": name})
    return (jobs or 0.0) + (items or 0.0)


def sent_for(workers: list[FakeWorker], batch_id: str) -> list[Any]:
    return [r for w in workers for r in w.requests if r.request_id.startswith(batch_id)]


async def test_a_batch_runs_at_batch_priority_and_returns_results_in_order(mesh: Mesh) -> None:
    before = {name: sample(name) for name in ("submitted", "succeeded", "ok")}
    texts = [f"item number {i}" for i in range(12)]
    job = await mesh.stub.SubmitBatch(batch(*texts, max_tokens=8), timeout=5)
    assert (job.total, job.display_name) == (12, "test")
    assert job.state in (router_pb2.BATCH_STATE_QUEUED, router_pb2.BATCH_STATE_RUNNING)
    assert job.HasField("created_at") and not job.HasField("finished_at")

    done = await wait_state(mesh.stub, job.batch_id, DONE)
    assert done.state == router_pb2.BATCH_STATE_SUCCEEDED
    assert (done.completed, done.failed) == (12, 0)
    assert done.finished_at.ToNanoseconds() >= done.created_at.ToNanoseconds()

    got = await results(mesh.stub, job.batch_id)
    assert [(r.index, r.custom_id) for r in got] == [(i, f"q{i}") for i in range(12)]
    assert [r.text for r in got] == [f"echo: {t}" for t in texts]
    assert all(r.finish_reason == common_pb2.FINISH_REASON_STOP and not r.error_code for r in got)
    assert [r.usage.completion_tokens for r in got] == [4] * 12

    sent = sent_for(mesh.workers, job.batch_id)
    assert len(sent) == 12
    # Other tests' jobs may end meanwhile: at least this one's counts were added.
    assert sample("submitted") >= before["submitted"] + 1
    assert sample("succeeded") >= before["succeeded"] + 1
    assert sample("ok") >= before["ok"] + 12
    assert {r.priority for r in sent} == {common_pb2.PRIORITY_BATCH}


async def test_items_are_checked_at_submission(mesh: Mesh) -> None:
    cases: list[tuple[router_pb2.SubmitBatchRequest, str]] = [
        (router_pb2.SubmitBatchRequest(), "items: must not be empty"),
        (batch("a", "b"), ""),  # valid: a control
    ]
    bad_sampling = batch("fine", "bad")
    bad_sampling.items[1].request.sampling.temperature = -1
    cases.append((bad_sampling, "items[1].request.sampling.temperature: must be >= 0"))
    twice = batch("a", "b")
    twice.items[1].custom_id = "q0"
    cases.append((twice, "items[1].custom_id: 'q0' is used twice"))
    unknown_model = batch("a")
    unknown_model.items[0].request.model = "no-such-model"
    cases.append((unknown_model, "items[0].request.model: unknown model 'no-such-model'"))
    for request, message in cases:
        if not message:
            await mesh.stub.SubmitBatch(request, timeout=5)
            continue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.stub.SubmitBatch(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(message)


async def test_unknown_batch_is_not_found(mesh: Mesh) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: mesh.stub.GetBatch(router_pb2.GetBatchRequest(batch_id="batch-nope"), timeout=5),
        lambda: mesh.stub.CancelBatch(router_pb2.CancelBatchRequest(batch_id="batch-nope"), timeout=5),
        lambda: results(mesh.stub, "batch-nope"),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_the_job_and_keeps_finished_results(mesh: Mesh) -> None:
    for w in mesh.workers:
        w.hold_after = 1
        w.release.clear()
    try:
        job = await mesh.stub.SubmitBatch(batch(*[f"held {i}" for i in range(40)]), timeout=5)
        await wait_until(lambda: len(sent_for(mesh.workers, job.batch_id)) >= 4, what="items started")
        cancelled = await mesh.stub.CancelBatch(
            router_pb2.CancelBatchRequest(batch_id=job.batch_id), timeout=5
        )
        assert cancelled.state == router_pb2.BATCH_STATE_CANCELLED
        assert cancelled.HasField("finished_at")
        # The held streams were cancelled on the workers.
        started = {r.request_id for r in sent_for(mesh.workers, job.batch_id)}
        await wait_until(
            lambda: started <= {rid for w in mesh.workers for rid in w.cancelled}, what="streams cancelled"
        )
    finally:
        for w in mesh.workers:
            w.hold_after = None
            w.release.set()
    await asyncio.sleep(0.2)
    final = await mesh.stub.GetBatch(router_pb2.GetBatchRequest(batch_id=job.batch_id), timeout=5)
    assert final.state == router_pb2.BATCH_STATE_CANCELLED
    assert final.completed < 40
    assert len(await results(mesh.stub, job.batch_id)) == final.completed + final.failed
    # Cancelling again answers the job as it stands.
    again = await mesh.stub.CancelBatch(router_pb2.CancelBatchRequest(batch_id=job.batch_id), timeout=5)
    assert again.state == router_pb2.BATCH_STATE_CANCELLED


async def test_list_batches_pages_newest_first(mesh: Mesh) -> None:
    ids = []
    for i in range(3):
        job = await mesh.stub.SubmitBatch(batch(f"list {i}"), timeout=5)
        ids.append(job.batch_id)
        await asyncio.sleep(0.01)
    first = await mesh.stub.ListBatches(router_pb2.ListBatchesRequest(page_size=2), timeout=5)
    assert [j.batch_id for j in first.jobs] == ids[::-1][:2]
    assert first.next_page_token
    second = await mesh.stub.ListBatches(
        router_pb2.ListBatchesRequest(page_size=2, page_token=first.next_page_token), timeout=5
    )
    assert second.jobs[0].batch_id == ids[0]
    # "²" passes str.isdigit but not int(): the fuzzer found it answered UNKNOWN.
    for token in ("zz", "²", "-1"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.stub.ListBatches(router_pb2.ListBatchesRequest(page_token=token), timeout=5)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, token
        assert "page_token" in (caught.value.details() or "")


@pytest.fixture
async def held_worker() -> AsyncIterator[tuple[FakeWorker, str]]:
    worker = FakeWorker("takeover")
    server = await start_fake(worker)
    yield worker, server.address
    worker.release.set()
    await server.stop(0)


async def test_another_replica_takes_over_a_job_whose_router_stopped(
    held_worker: tuple[FakeWorker, str], tmp_path: Any
) -> None:
    worker, address = held_worker
    store = f"sqlite+aiosqlite:///{tmp_path / 'batches.db'}"
    settings = {"worker_addresses": [address], "batch_store_url": store, "batch_lease_s": 0.3}
    first = await start_router(**settings, batch_concurrency=2)
    worker.hold_after = 1
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = router_pb2_grpc.InferenceStub(channel)
        await wait_healthy(stub, {address})
        job = await stub.SubmitBatch(batch(*[f"take {i}" for i in range(6)]), timeout=5)
        await wait_until(lambda: len(worker.requests) >= 2, what="first items started")
    # The first replica goes away mid-job, before any item finished.
    await first.stop(0)
    worker.hold_after = None
    worker.release.set()

    second = await start_router(**settings)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            done = await wait_state(stub, job.batch_id, DONE)
            got = await results(stub, job.batch_id)
    finally:
        await second.stop(0)
    assert done.state == router_pb2.BATCH_STATE_SUCCEEDED
    assert (done.completed, done.failed) == (6, 0)
    assert [r.text for r in got] == [f"echo: take {i}" for i in range(6)]


async def test_a_role_without_the_batch_priority_cannot_submit(mesh: Mesh) -> None:
    # With auth off every caller has the admin role; here it is redefined without BATCH.
    addresses = [s.address for s in mesh.worker_servers]
    router = await start_router(worker_addresses=addresses, roles=["admin:priorities=interactive,standard"])
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, set(addresses))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitBatch(batch("not allowed"), timeout=5)
    finally:
        await router.stop(0)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not use priority BATCH" in (caught.value.details() or "")


async def test_a_router_whose_batch_store_is_away_still_serves_and_says_so(mesh: Mesh) -> None:
    addresses = [s.address for s in mesh.worker_servers]
    store = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none"
    router = await start_router(worker_addresses=addresses, batch_store_url=store)
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, set(addresses))
            assert text_of(await collect(stub, chat_request("still here"), timeout=5)) == "echo: still here"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitBatch(batch("waits"), timeout=10)
    finally:
        await router.stop(0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert (caught.value.details() or "").startswith("the batch store is unavailable")


async def test_a_queued_job_starts_as_soon_as_a_slot_frees(mesh: Mesh) -> None:
    addresses = [s.address for s in mesh.worker_servers]
    # One job at a time and a long lease: the second job may only wait for the first to end.
    router = await start_router(worker_addresses=addresses, batch_jobs_per_replica=1, batch_lease_s=600)
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, set(addresses))
            first = await stub.SubmitBatch(batch("first job"), timeout=5)
            second = await stub.SubmitBatch(batch("second job"), timeout=5)
            for job in (first, second):
                done = await wait_state(stub, job.batch_id, DONE, timeout=5)
                assert done.state == router_pb2.BATCH_STATE_SUCCEEDED
    finally:
        await router.stop(0)
