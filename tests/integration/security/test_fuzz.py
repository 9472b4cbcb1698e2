"""Fuzz every public RPC (Inference and Admin) through a router with auth, quotas and guardrails
on, in front of a real session service and fake workers: generated messages with extreme and
malformed fields, bytes that are no protobuf at all, messages past the maximum size. Every call
must end with a status (no hang, no INTERNAL or UNKNOWN), every call without a key must be
refused, and every server must still serve."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infermesh.router.v1 import router_pb2
from services.common.server import DEFAULT_MAX_MESSAGE_BYTES
from services.session.__main__ import create_key
from services.session.server import create_server
from tests.integration.router.fakes import FakeEmbedder, FakeWorker, start_fake
from tests.integration.router.helpers import start_router
from tests.integration.security.pb_strategies import messages
from tests.integration.session.conftest import session_config

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

EXAMPLES_PER_RPC = 100
CALL_TIMEOUT_S = 15.0
METHODS = [
    (f"/{service.full_name}/{method.name}", method)
    for service in router_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


class Fuzzed:
    """Codes seen per RPC, and what went wrong."""

    def __init__(self) -> None:
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.problems: list[str] = []
        self.unkeyed = 0  # calls sent without an API key

    @property
    def cases(self) -> int:
        return sum(self.codes.values())

    def call(
        self, channel: grpc.Channel, path: str, method: Any, payload: bytes, metadata: Any, keyed: bool = True
    ) -> None:
        identity = bytes  # the payload goes out as given (it may be no protobuf at all)
        start = time.monotonic()
        try:
            if method.server_streaming:
                call = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
                for _ in call(payload, timeout=CALL_TIMEOUT_S, metadata=metadata):
                    pass
            else:
                call = channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)
                call(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
            code = grpc.StatusCode.OK
            details = ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        elapsed = time.monotonic() - start
        self.codes[(path.rsplit("/", 1)[-1], code.name)] += 1
        if elapsed >= CALL_TIMEOUT_S - 1:
            self.problems.append(f"{path}: no answer within {elapsed:.1f}s ({code.name})")
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            self.problems.append(f"{path}: {code.name} {details[:200]}")
        self.unkeyed += not keyed
        # Without a key nothing is served: refused for the key, or, bytes that are no message, for those.
        if not keyed and code is not grpc.StatusCode.UNAUTHENTICATED and not _malformed(code, details):
            self.problems.append(f"{path} without a key: {code.name} {details[:200]}")


def _malformed(code: grpc.StatusCode, details: str) -> bool:
    # The field with bad UTF-8 named, or the message that did not parse (services.common.malformed).
    return code is grpc.StatusCode.INVALID_ARGUMENT and (
        "is not valid UTF-8" in details or details.startswith("request: could not be parsed as")
    )


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, str, list[Any]]]:
    db: Path = tmp_path_factory.mktemp("fuzz") / "session.db"
    config = session_config(f"sqlite+aiosqlite:///{db}")
    admin_key = await create_key(config, "fuzz", "admin", "fuzzing")
    session = await create_server(config)
    await session.start()
    workers = [await start_fake(FakeWorker("w0")), await start_fake(FakeEmbedder())]
    router = await start_router(
        worker_addresses=[workers[0].address],
        embedder_addresses=[workers[1].address],
        session_address=session.address,
        auth_enabled=True,
        guard_prompt_injection=True,
        guard_pii_input=True,
        guard_pii_output=True,
        guard_max_input_chars=1_000_000,
        quota_tokens_per_minute=10_000_000,
        quota_requests_per_s=10_000,
    )
    yield router.address, admin_key, [router, session, *workers]
    for server in (router, session, *workers):
        await server.stop(0)


def _fuzz_rpc(channel: grpc.Channel, path: str, method: Any, admin_key: str, fuzzed: Fuzzed) -> None:
    @settings(
        max_examples=EXAMPLES_PER_RPC, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        message=messages(method.input_type),
        keyed=st.sampled_from([True] * 9 + [False]),
        raw=st.one_of(st.none(), st.none(), st.binary(min_size=1, max_size=64)),
    )
    def one(message: Any, keyed: bool, raw: bytes | None) -> None:
        metadata = (("authorization", f"Bearer {admin_key}"),) if keyed else ()
        payload = raw if raw is not None else message.SerializeToString()
        fuzzed.call(channel, path, method, payload, metadata, keyed)

    one()
    # Past the maximum message size.
    oversized = b"\x0a" + b"\xff\xff\xff\x0f" + b"x" * (DEFAULT_MAX_MESSAGE_BYTES + 1024)
    fuzzed.call(channel, path, method, oversized, (("authorization", f"Bearer {admin_key}"),))


def _fuzz_all(address: str, admin_key: str) -> Fuzzed:
    fuzzed = Fuzzed()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        for path, method in METHODS:
            _fuzz_rpc(channel, path, method, admin_key, fuzzed)
    return fuzzed


async def test_every_public_rpc_answers_every_fuzzed_message_with_a_status(fuzz_mesh):
    address, admin_key, servers = fuzz_mesh
    fuzzed = await asyncio.to_thread(_fuzz_all, address, admin_key)
    by_code = collections.Counter(code for (_rpc, code) in fuzzed.codes.elements())
    print(f"\nfuzz: {fuzzed.cases} cases over {len(METHODS)} RPCs; status codes: {dict(by_code)}")
    kinds = collections.Counter(problem.split(": ", 1)[0].rsplit("/", 1)[-1] for problem in fuzzed.problems)
    assert not fuzzed.problems, f"{dict(kinds)}; e.g.\n" + "\n".join(sorted(set(fuzzed.problems))[:12])
    assert fuzzed.cases >= len(METHODS) * 10
    assert fuzzed.unkeyed >= len(METHODS), "every RPC should have been called without a key too"
    assert {rpc for rpc, _code in fuzzed.codes} == {path.rsplit("/", 1)[-1] for path, _m in METHODS}
    oversized = {rpc: code for (rpc, code) in fuzzed.codes if code == "RESOURCE_EXHAUSTED"}
    assert set(oversized) == {path.rsplit("/", 1)[-1] for path, _m in METHODS}
    for server in servers:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING, server.address
