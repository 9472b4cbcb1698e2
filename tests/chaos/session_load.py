"""Append load on the session service for the drills: writers, what was acknowledged, and the
check that the stored history holds each acknowledged message once, in the writer's order."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.session.crypto import KeyRing
from tests.chaos.harness import ServiceProcess

TENANT = "chaos"
# Codes a client retries: the append may or may not have committed, and the client message id
# makes the retry safe either way.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


def session_env(database_url: str, state_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of a session service process on `database_url` (a postgresql:// URL)."""
    env = {
        "INFERMESH_SESSION_DATABASE_URL": database_url,
        "INFERMESH_SESSION_STATE_DIR": str(state_dir),
        "INFERMESH_SESSION_ENCRYPTION_KEYS": KeyRing.new_entry("chaos"),
        "INFERMESH_SESSION_LOG_LEVEL": "warning",
        "INFERMESH_SESSION_AUTO_MIGRATE": "true",
    }
    env.update({f"INFERMESH_SESSION_{k.upper()}": v for k, v in settings.items()})
    return env


@asynccontextmanager
async def session_service(env: Mapping[str, str], log_dir: Path) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess("session", env, log_dir)
    await service.started()
    try:
        yield service
    finally:
        service.stop()


@dataclasses.dataclass
class Attempt:
    at: float
    ok: bool
    code: str = ""


@dataclasses.dataclass
class AppendLoad:
    """`total` appends from `writers` writers spread over `sessions` sessions (writer w on session
    w % sessions), each with a client message id; with `retry`, failed appends are retried with
    the same id until they succeed."""

    stub: session_pb2_grpc.SessionStoreStub
    writers: int = 16
    total: int = 1000
    sessions: int = 4
    retry: bool = False
    timeout_s: float = 3.0
    read_windows: bool = False
    session_ids: list[str] = dataclasses.field(default_factory=list)
    # (session id, client id) -> seq, for every acknowledged append.
    acked: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    # Appends given up on (without retry); each may or may not be stored.
    gave_up: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    # Why appends were given up on, by status and message.
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    done: int = 0

    async def create_sessions(self) -> None:
        for _ in range(self.sessions):
            created = await self.stub.CreateSession(
                session_pb2.CreateSessionRequest(
                    tenant=TENANT, user_id="chaos", model="smollm2-135m-instruct"
                ),
                timeout=10,
            )
            self.session_ids.append(created.session_id)

    async def run(self) -> None:
        if not self.session_ids:
            await self.create_sessions()
        per_writer = [
            self.total // self.writers + (w < self.total % self.writers) for w in range(self.writers)
        ]
        await asyncio.gather(*(self._writer(w, n) for w, n in enumerate(per_writer)))

    async def _writer(self, w: int, count: int) -> None:
        session_id = self.session_ids[w % len(self.session_ids)]
        for n in range(count):
            client_id = f"w{w}-{n:04d}"
            request = session_pb2.AppendMessagesRequest(
                tenant=TENANT,
                session_id=session_id,
                messages=[
                    common_pb2.NewMessage(
                        role=common_pb2.ROLE_USER, content=client_id, client_msg_id=client_id
                    )
                ],
            )
            while True:
                try:
                    reply = await self.stub.AppendMessages(request, timeout=self.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    self.attempts.append(Attempt(time.monotonic(), False, exc.code().name))
                    if self.retry and exc.code() in RETRYABLE:
                        await asyncio.sleep(0.05)
                        continue
                    self.gave_up.add((session_id, client_id))
                    self.errors[f"{exc.code().name}: {exc.details()}"[:160]] += 1
                    break
                self.attempts.append(Attempt(time.monotonic(), True))
                self.acked[(session_id, client_id)] = reply.messages[0].seq
                break
            self.done += 1
            if self.read_windows:
                await self._read_window(session_id)

    async def _read_window(self, session_id: str) -> None:
        try:
            await self.stub.GetWindow(
                session_pb2.GetWindowRequest(tenant=TENANT, session_id=session_id, token_budget=200),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            self.attempts.append(Attempt(time.monotonic(), False, "window " + exc.code().name))

    def success_ratio(self, start: float, end: float) -> tuple[int, float]:
        """Append attempts between the two times, and the share that succeeded."""
        window = [a for a in self.attempts if start <= a.at <= end and not a.code.startswith("window")]
        return len(window), (sum(a.ok for a in window) / len(window) if window else 1.0)

    async def verify(self) -> Verdict:
        """Read every session's history back and compare it with what was acknowledged."""
        stored: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        gaps = 0
        out_of_order = 0
        for session_id in self.session_ids:
            history = await all_history(self.stub, session_id)
            seqs = [m.seq for m in history]
            gaps += len(set(range(1, len(seqs) + 1)) ^ set(seqs))
            last_by_writer: dict[str, int] = {}
            for m in history:
                stored[(session_id, m.client_msg_id)].append(m.seq)
                if m.content != m.client_msg_id:
                    out_of_order += 1
                writer, n = m.client_msg_id.split("-")
                # A writer's appends are sequential: their seqs must follow its own order.
                if last_by_writer.get(writer, -1) > int(n):
                    out_of_order += 1
                last_by_writer[writer] = int(n)
        lost = sum(1 for key, seq in self.acked.items() if stored.get(key) != [seq])
        duplicates = sum(len(seqs) - 1 for seqs in stored.values() if len(seqs) > 1)
        unexpected = sum(1 for key in stored if key not in self.acked and key not in self.gave_up)
        return Verdict(lost, duplicates, out_of_order, gaps, unexpected, sum(len(v) for v in stored.values()))


@dataclasses.dataclass(frozen=True)
class Verdict:
    lost: int
    duplicates: int
    out_of_order: int
    gaps: int
    # Stored messages that no writer sent or left unresolved.
    unexpected: int
    stored: int

    @property
    def clean(self) -> bool:
        """Nothing lost, doubled, reordered, skipped or made up."""
        return self.lost == self.duplicates == self.out_of_order == self.gaps == self.unexpected == 0


async def all_history(stub: session_pb2_grpc.SessionStoreStub, session_id: str) -> list[common_pb2.Message]:
    out: list[common_pb2.Message] = []
    after = 0
    while True:
        page = await stub.GetHistory(
            session_pb2.GetHistoryRequest(
                tenant=TENANT, session_id=session_id, after_seq=after, page_size=500
            ),
            timeout=10,
        )
        out.extend(page.messages)
        if not page.has_more:
            return out
        after = page.messages[-1].seq
