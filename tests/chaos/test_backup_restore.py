"""Drill 10: back up the session database while writers append, restore it into a fresh Postgres.

Proves that `make backup` (scripts/backup.py: pg_dump, custom format) taken under load is one
consistent snapshot that `make restore` brings back whole: a session service started on the
restored instance (same encryption keys, no migration at start) serves every message that was
acknowledged before the backup started, byte-identical after decryption, with the same seq, in
order, once; each session's restored history is a prefix of what the original holds at the end
(nothing torn, reordered or made up), and the restored rows are still encrypted at rest.

Reported: RPO, the acknowledged messages that are not in the backup (all acknowledged after it
started) and the window they were acknowledged in; RTO, the restore plus the time until the new
session service answers SERVING (`recovery` in the table).
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from pathlib import Path

import asyncpg
import grpc

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2_grpc
from tests.chaos.harness import ROOT, DrillResult, ThrowawayPostgres, recording, wait_until
from tests.chaos.session_load import AppendLoad, all_history, session_env, session_service

WRITERS = 8
TOTAL = 1600
SESSIONS = 4
# The backup starts once this many appends were made, so that writes go on during and after it.
BACKUP_AT = TOTAL // 4

History = dict[str, list[common_pb2.Message]]


async def backup_script(*args: str, database_url: str, state_dir: Path) -> str:
    """Run scripts/backup.py as `make backup`/`make restore` do; returns what it printed."""
    env = {
        **os.environ,
        "INFERMESH_SESSION_DATABASE_URL": database_url,
        "INFERMESH_SESSION_STATE_DIR": str(state_dir),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "backup.py"),
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"backup.py {' '.join(args)}: exit {proc.returncode}: {err.decode()}"
    return out.decode().strip()


async def histories(stub: session_pb2_grpc.SessionStoreStub, session_ids: list[str]) -> History:
    return {session_id: await all_history(stub, session_id) for session_id in session_ids}


async def stored_in_clear(url: str) -> tuple[int, int]:
    """(message rows, rows whose content is not sealed) in the database at `url`."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM messages")
        clear = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE content IS NOT NULL OR content_enc IS NULL"
        )
        return int(rows), int(clear)
    finally:
        await conn.close()


def compare(restored: History, original: History, acked_before: dict[tuple[str, str], int]) -> dict[str, int]:
    """How the restored histories differ from what they must be (all zero when they are right)."""
    counts: collections.Counter[str] = collections.Counter()
    for session_id, messages in restored.items():
        final = original[session_id]
        seen: set[str] = set()
        for i, message in enumerate(messages):
            counts["duplicates"] += message.client_msg_id in seen
            seen.add(message.client_msg_id)
            counts["out_of_order"] += message.seq != i + 1
            # What the writer sent, byte for byte (the load sends its client id as the content).
            counts["altered"] += message.content.encode() != message.client_msg_id.encode()
            # A snapshot: the restored history is the start of what the original holds at the end.
            counts["not_a_prefix"] += i >= len(final) or final[i] != message
    present = {(session_id, m.client_msg_id): m.seq for session_id, ms in restored.items() for m in ms}
    counts["lost"] = sum(present.get(key) != seq for key, seq in acked_before.items())
    return {k: counts[k] for k in ("lost", "duplicates", "out_of_order", "altered", "not_a_prefix")}


async def test_backup_during_writes_restores_every_acknowledged_message(
    tmp_path: Path, log_dir: Path
) -> None:
    source, fresh = ThrowawayPostgres(), ThrowawayPostgres()
    result = DrillResult(
        "10 backup/restore",
        f"{WRITERS} writers, {TOTAL} appends",
        "pg_dump under writes, restore to new pg",
    )
    running: asyncio.Task[None] | None = None
    with recording(result):
        try:
            await source.start()
            env = session_env(source.url, tmp_path / "source", db_timeout_s="2")
            async with (
                session_service(env, log_dir) as service,
                grpc.aio.insecure_channel(service.address) as channel,
            ):
                stub = session_pb2_grpc.SessionStoreStub(channel)
                load = AppendLoad(stub, writers=WRITERS, total=TOTAL, sessions=SESSIONS, retry=True)
                await load.create_sessions()
                running = asyncio.create_task(load.run())
                await wait_until(lambda: load.done >= BACKUP_AT, timeout=60)

                acked_before = dict(load.acked)
                backup_started = time.monotonic()
                dump = await backup_script(
                    "backup", "--dir", str(tmp_path / "backups"), database_url=source.url, state_dir=tmp_path
                )
                backup_s = time.monotonic() - backup_started
                # Writes went on during the backup and after it: otherwise it proved nothing.
                assert load.done < TOTAL, "the load ended before the backup did; raise TOTAL"
                await asyncio.wait_for(running, timeout=120)
                last_ack = max(a.at for a in load.attempts if a.ok)
                original = await histories(stub, load.session_ids)
            assert dump.endswith(".dump"), dump

            await fresh.start()
            restore_started = time.monotonic()
            await backup_script("restore", dump, database_url=fresh.url, state_dir=tmp_path)
            restore_s = time.monotonic() - restore_started
            # Same keys, the restored database, no migration at start: the backup brings the schema.
            restored_env = {
                **env,
                "INFERMESH_SESSION_DATABASE_URL": fresh.url,
                "INFERMESH_SESSION_STATE_DIR": str(tmp_path / "restored"),
                "INFERMESH_SESSION_AUTO_MIGRATE": "false",
            }
            serving_started = time.monotonic()
            async with session_service(restored_env, log_dir) as restored_service:
                serving_s = time.monotonic() - serving_started
                async with grpc.aio.insecure_channel(restored_service.address) as channel:
                    restored = await histories(session_pb2_grpc.SessionStoreStub(channel), load.session_ids)
            rows, clear = await stored_in_clear(fresh.url)

            diff = compare(restored, original, acked_before)
            in_backup = {(s, m.client_msg_id) for s, ms in restored.items() for m in ms}
            not_in_backup = [key for key in load.acked if key not in in_backup]
            result.total, result.completed, result.failed = load.total, len(load.acked), len(load.gave_up)
            result.lost, result.duplicates = diff["lost"], diff["duplicates"]
            result.recovery_s = restore_s + serving_s
            result.note = (
                f"RPO {len(not_in_backup)} acked msgs in {last_ack - backup_started:.1f} s after its start;"
                f" RTO restore {restore_s:.2f} s + SERVING {serving_s:.2f} s; backup {backup_s:.2f} s,"
                f" {len(in_backup)} msgs"
            )
            result.passed = not any(diff.values()) and clear == 0 and rows == len(in_backup)
            assert not any(diff.values()), diff
            assert len(acked_before) >= BACKUP_AT - WRITERS and len(in_backup) >= len(acked_before)
            assert rows == len(in_backup) and clear == 0, f"{rows} rows, {clear} not encrypted at rest"
        finally:
            if running is not None:
                running.cancel()
            source.remove()
            fresh.remove()
