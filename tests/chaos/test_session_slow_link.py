"""Drill 7: a slow and flaky link between the router and the session service, then none at all.

The router reaches the session service only through a TCP fault proxy. Chats that use a session
run while the link adds latency and resets connections, then while it refuses every connection,
then after it heals. Proves that
- no call finishes more than 50 ms past its deadline (a slow history read or record must not
  hold the answer past it);
- with the session service unreachable, chat still answers, without history, and says so
  (DEGRADATION_STEP_HISTORY_UNAVAILABLE);
- every turn the router recorded without a degradation note is in the history once;
- once the link is back, chats use history again by themselves (recovery time).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from pathlib import Path

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.chaos.generation_mesh import generation_mesh
from tests.chaos.harness import DrillResult, FaultProxy, ServiceProcess, recording, wait_until
from tests.chaos.session_load import session_env

LATE_S = 0.05
# Deadlines of the chats on the slow link, and elsewhere (generous: a shared CPU is slow).
SLOW_TIMEOUT_S = 6.0
TIMEOUT_S = 15.0
MAX_TOKENS = 4


@dataclasses.dataclass
class Chat:
    text: str
    timeout_s: float
    elapsed_s: float = 0.0
    code: grpc.StatusCode | None = None
    without_history: bool = False
    reply: str = ""
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.code is None

    @property
    def late(self) -> bool:
        return self.elapsed_s > self.timeout_s + LATE_S


async def chat(
    stub: router_pb2_grpc.InferenceStub, session_id: str, text: str, timeout_s: float = TIMEOUT_S
) -> Chat:
    request = router_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        session_id=session_id,
        max_tokens=MAX_TOKENS,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )
    out = Chat(text, timeout_s)
    start = time.monotonic()
    try:
        async for resp in stub.Generate(request, timeout=timeout_s):
            out.reply += resp.text
            out.tokens += len(resp.token_ids)
            out.without_history |= any(
                d.step == common_pb2.DEGRADATION_STEP_HISTORY_UNAVAILABLE for d in resp.degraded
            )
    except grpc.aio.AioRpcError as exc:
        out.code = exc.code()
    out.elapsed_s = time.monotonic() - start
    return out


async def chats(
    stub: router_pb2_grpc.InferenceStub,
    session_id: str,
    label: str,
    count: int,
    at_once: int,
    timeout_s: float = TIMEOUT_S,
) -> list[Chat]:
    done: list[Chat] = []
    for first in range(0, count, at_once):
        batch = [
            chat(stub, session_id, f"{label} {n}: say a word", timeout_s)
            for n in range(first, min(count, first + at_once))
        ]
        done.extend(await asyncio.gather(*batch))
    return done


async def test_slow_then_broken_link_between_router_and_session(tmp_path: Path, log_dir: Path) -> None:
    result = DrillResult("7 slow session link", "chats with a session", "latency+resets, then refuse")
    with recording(result):
        session = ServiceProcess("session", session_env("", tmp_path / "session"), log_dir)
        await session.started()
        try:
            with FaultProxy("127.0.0.1", session.port) as proxy:
                async with generation_mesh(log_dir, workers=1, session_address=proxy.address) as mesh:
                    stub = mesh.stub
                    created = await stub.CreateSession(
                        router_pb2.CreateSessionRequest(user_id="chaos"), timeout=10
                    )
                    sid = created.session_id

                    healthy = await chats(stub, sid, "healthy", 2, 1)
                    assert all(c.ok and not c.without_history for c in healthy), healthy

                    proxy.set(latency_s=0.1, jitter_s=0.2, reset_probability=0.05)
                    slow = await chats(stub, sid, "slow", 8, 4, SLOW_TIMEOUT_S)

                    proxy.set(refuse=True)
                    proxy.reset_all()
                    broken = await chats(stub, sid, "unreachable", 4, 4)

                    proxy.heal()
                    after: list[Chat] = []

                    async def uses_history_again() -> bool:
                        after.append(await chat(stub, sid, f"healed {len(after)}: say a word"))
                        return after[-1].ok and not after[-1].without_history

                    result.recovery_s = await wait_until(uses_history_again, timeout=30, interval=0.1)
                    history = await all_history(stub, sid)
        finally:
            session.stop()

        every = healthy + slow + broken + after
        stored = collections.Counter(m.content for m in history if m.role == common_pb2.ROLE_USER)
        recorded = [c for c in every if c.ok and not c.without_history]
        result.total = len(every)
        result.completed = sum(c.ok for c in every)
        result.failed = result.total - result.completed
        result.lost = sum(1 for c in recorded if stored[c.text] == 0)
        result.duplicates = sum(n - 1 for n in stored.values() if n > 1)
        late = [c for c in every if c.late]
        broken_ok = sum(c.ok and c.without_history for c in broken)
        codes = collections.Counter(
            f"{c.code.name} after {c.tokens} tokens" for c in slow if c.code is not None
        )
        result.note = (
            f"{len(late)} late; slow link: {sum(c.ok for c in slow)}/{len(slow)} ok "
            f"{dict(codes) if codes else ''}; "
            f"unreachable: {broken_ok}/{len(broken)} answered without history"
        )
        result.passed = not late and broken_ok == len(broken) and result.lost == result.duplicates == 0
        assert not late, [(c.text, c.elapsed_s, c.code) for c in late]
        assert broken_ok == len(broken), [(c.text, c.elapsed_s, c.code, c.without_history) for c in broken]
        assert result.lost == 0 and result.duplicates == 0, (stored, recorded)


async def all_history(stub: router_pb2_grpc.InferenceStub, session_id: str) -> list[common_pb2.Message]:
    out: list[common_pb2.Message] = []
    after = 0
    while True:
        page = await stub.GetHistory(
            router_pb2.GetHistoryRequest(session_id=session_id, after_seq=after, page_size=500), timeout=10
        )
        out.extend(page.messages)
        if not page.has_more:
            return out
        after = page.messages[-1].seq
