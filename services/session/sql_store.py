"""The session store on SQLAlchemy async: the same code for SQLite and Postgres."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable
from services.session import db, pg_append
from services.session.crypto import DecryptError, KeyRing, message_aad
from services.session.model import (
    AppendResult,
    EraseResult,
    HistoryPage,
    Message,
    NewMessage,
    NewSession,
    Role,
    SessionExport,
    SessionInfo,
    Window,
)
from services.session.tables import messages, sessions
from services.session.window import select_window

# Newest-first batch size when collecting a window.
WINDOW_BATCH = 256
# Appends arriving together share one statement (and one commit): at most APPEND_SLOTS such
# statements run at once, so that under load the others gather into the next one (measured on
# 2 cores with 32 clients: 2 slots cost a quarter less CPU per append than one statement
# each), of at most APPEND_BATCH appends. Reads keep the rest of the pool.
APPEND_SLOTS = 2
APPEND_BATCH = 32


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _session_info(row: Any) -> SessionInfo:
    return SessionInfo(
        session_id=row.id,
        tenant=row.tenant,
        user_id=row.user_id,
        model=row.model,
        created_at=row.created_at,
        updated_at=row.updated_at,
        metadata=dict(row.metadata or {}),
        last_seq=row.last_seq,
        retention_days=row.retention_days,
    )


def _message(row: Any, content: str) -> Message:
    return Message(
        seq=row.seq,
        role=Role(row.role),
        content=content,
        client_msg_id=row.client_msg_id or "",
        token_count=row.token_count,
        created_at=row.created_at,
    )


@dataclasses.dataclass(frozen=True)
class _SessionRef:
    """What sealing needs of a session row."""

    tenant: str
    id: str


def _moved(expected: int, actual: int | None) -> Aborted:
    at = f"the session is at {actual}" if actual is not None else "the session has moved"
    return Aborted(f"expected_last_seq={expected} but {at}; re-read the history and retry")


# Columns of `sessions` named like the SessionInfo fields they hold.
_SESSION_FIELDS = (
    "tenant",
    "user_id",
    "model",
    "created_at",
    "updated_at",
    "metadata",
    "last_seq",
    "retention_days",
)
_MESSAGE_COLUMNS = (
    messages.c.seq,
    messages.c.role,
    messages.c.content,
    messages.c.client_msg_id,
    messages.c.token_count,
    messages.c.created_at,
    messages.c.key_id,
    messages.c.content_enc,
)


class SqlStore:
    """Implements `services.session.store.Store`.

    With a key ring, content is sealed before it reaches the database; without
    one (tests of the storage logic only) it is stored as given.
    """

    def __init__(self, engine: AsyncEngine, keys: KeyRing | None = None) -> None:
        self.engine = engine
        self.keys = keys
        self._sqlite = db.is_sqlite(engine)
        # One statement per append on Postgres needs no transaction around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.last_seqs = pg_append.LastSeqs()
        self._appends: pg_append.Batcher[pg_append.Append, pg_append.Outcome | Exception] = pg_append.Batcher(
            self._run_appends,
            key=lambda a: (a.tenant, a.session_id),
            slots=APPEND_SLOTS,
            max_batch=APPEND_BATCH,
        )

    @classmethod
    def from_url(
        cls, database_url: str, *, pool_size: int = 5, timeout_s: float = 5.0, keys: KeyRing | None = None
    ) -> SqlStore:
        return cls(db.create_engine(database_url, pool_size=pool_size, timeout_s=timeout_s), keys)

    def _sealed(self, session: Any, seq: int, content: str) -> dict[str, Any]:
        """Column values holding `content` as message `seq` of `session` (a sessions row)."""
        if self.keys is None:
            return {"content": content, "key_id": None, "content_enc": None}
        key_id, sealed = self.keys.seal(content.encode(), message_aad(session.tenant, session.id, seq))
        return {"content": None, "key_id": key_id, "content_enc": sealed}

    def _message(self, row: Any, session: Any) -> Message:
        if row.key_id is None:
            # Written before encryption was on; rotate-keys seals it.
            return _message(row, row.content)
        try:
            if self.keys is None:
                raise DecryptError("no key ring configured")
            aad = message_aad(session.tenant, session.id, row.seq)
            return _message(row, self.keys.open(row.key_id, row.content_enc, aad).decode())
        except DecryptError as exc:
            raise FailedPrecondition(f"stored message {row.seq} cannot be decrypted: {exc}") from exc

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _tx(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction. Writers serialise on SQLite through BEGIN IMMEDIATE;
        on Postgres they lock the rows they change (FOR UPDATE)."""
        with db.db_errors():
            async with self.engine.connect() as conn:
                if write and self._sqlite:
                    conn = await conn.execution_options(**{db.SQLITE_BEGIN: "IMMEDIATE"})
                async with conn.begin():
                    yield conn

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @staticmethod
    async def _find_session(
        conn: AsyncConnection, tenant: str, session_id: str, *, lock: bool = False
    ) -> Any:
        query = sa.select(sessions).where(sessions.c.tenant == tenant, sessions.c.id == session_id)
        if lock:
            query = query.with_for_update()
        return (await conn.execute(query)).first()

    async def _session_row(
        self, conn: AsyncConnection, tenant: str, session_id: str, *, lock: bool = False
    ) -> Any:
        row = await self._find_session(conn, tenant, session_id, lock=lock)
        if row is None:
            raise NotFound(f"session {session_id!r} not found")
        return row

    async def create_session(self, new: NewSession) -> SessionInfo:
        info = await self._create_session(new)
        self.last_seqs.saw(info.tenant, info.session_id, info.last_seq)
        return info

    async def _create_session(self, new: NewSession) -> SessionInfo:
        now = _now()
        info = SessionInfo(
            new.session_id,
            new.tenant,
            new.user_id,
            new.model,
            now,
            now,
            dict(new.metadata),
            0,
            new.retention_days,
        )
        try:
            async with self._tx(write=True) as conn:
                existing = await self._find_session(conn, new.tenant, new.session_id)
                if existing is not None:
                    return self._same_session(_session_info(existing), new)
                values = {name: getattr(info, name) for name in _SESSION_FIELDS}
                await conn.execute(sa.insert(sessions).values(id=info.session_id, **values))
        except Aborted:
            # Lost a race with a concurrent create of the same id (Postgres).
            return self._same_session(await self.get_session(new.tenant, new.session_id), new)
        return info

    @staticmethod
    def _same_session(existing: SessionInfo, new: NewSession) -> SessionInfo:
        if existing.user_id != new.user_id or existing.model != new.model:
            raise AlreadyExists(f"session {new.session_id!r} already exists for another user or model")
        return existing

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo:
        async with self._tx() as conn:
            info = _session_info(await self._session_row(conn, tenant, session_id))
        self.last_seqs.saw(tenant, session_id, info.last_seq)
        return info

    async def append(
        self,
        tenant: str,
        session_id: str,
        messages_in: Sequence[NewMessage],
        expected_last_seq: int | None = None,
    ) -> AppendResult:
        predicted = (
            expected_last_seq if expected_last_seq is not None else self.last_seqs.get(tenant, session_id)
        )
        if not self._sqlite and predicted is not None:
            done = await self._append_one_statement(
                tenant, session_id, messages_in, predicted, expected_last_seq
            )
            if done is not None:
                self.last_seqs.saw(tenant, session_id, done.last_seq)
                return done
        result = await self._append_locked(tenant, session_id, messages_in, expected_last_seq)
        self.last_seqs.saw(tenant, session_id, result.last_seq)
        return result

    async def _append_one_statement(
        self,
        tenant: str,
        session_id: str,
        messages_in: Sequence[NewMessage],
        predicted: int,
        expected_last_seq: int | None,
    ) -> AppendResult | None:
        """The append as one statement (see pg_append); None when it must take the locking path."""
        now = _now()
        # Only tenant and id of the session row go into the associated data.
        ref = _SessionRef(tenant, session_id)
        rows = []
        written = []
        for i, m in enumerate(messages_in, start=1):
            seq = predicted + i
            sealed = self._sealed(ref, seq, m.content)
            rows.append(
                pg_append.Row(
                    m.client_msg_id or None,
                    int(m.role),
                    sealed["content"],
                    m.token_count,
                    sealed["key_id"],
                    sealed["content_enc"],
                )
            )
            written.append(Message(seq, Role(m.role), m.content, m.client_msg_id, m.token_count, now))
        found = await self._appends.submit(pg_append.Append(tenant, session_id, predicted, rows, now))
        if isinstance(found, Exception):
            raise found
        if not found.found:
            raise NotFound(f"session {session_id!r} not found")
        if found.inserted:
            return AppendResult(written, predicted + len(written))
        if found.duplicates:
            # A retry: the originals when every message is one (and the same), else the locking
            # path sorts out partial retries and reused ids.
            stored = {row.client_msg_id: self._message(row, ref) for row in found.duplicates}
            originals = [stored.get(m.client_msg_id) for m in messages_in]
            if all(
                o is not None and o.role == m.role and o.content == m.content
                for o, m in zip(originals, messages_in, strict=True)
            ):
                return AppendResult([o for o in originals if o is not None], found.last_seq)
            return None
        if expected_last_seq is not None:
            # last_seq moved past what the client saw (it only grows).
            raise _moved(expected_last_seq, found.last_seq if found.last_seq != expected_last_seq else None)
        return None

    async def _run_appends(self, appends: list[pg_append.Append]) -> list[pg_append.Outcome | Exception]:
        """One statement for `appends`. If it fails for another reason than the database being
        unavailable (one append's bad data), each runs alone so that only that one fails."""
        try:
            return list(await self._append_statement(appends))
        except Unavailable:
            raise
        except Exception as exc:
            if len(appends) == 1:
                return [exc]
        alone: list[pg_append.Outcome | Exception] = []
        for append in appends:
            try:
                alone.extend(await self._append_statement([append]))
            except Exception as exc:
                alone.append(exc)
        return alone

    async def _append_statement(self, appends: list[pg_append.Append]) -> list[pg_append.Outcome]:
        params = pg_append.parameters(appends)
        with db.db_errors():
            async with self._autocommit.connect() as conn:
                rows = (await conn.exec_driver_sql(pg_append.APPEND_SQL, params)).all()
        return pg_append.outcomes(rows, len(appends))

    async def _append_locked(
        self,
        tenant: str,
        session_id: str,
        messages_in: Sequence[NewMessage],
        expected_last_seq: int | None = None,
    ) -> AppendResult:
        async with self._tx(write=True) as conn:
            session = await self._session_row(conn, tenant, session_id, lock=True)
            stored = await self._by_client_id(conn, session, messages_in)
            if all(m.client_msg_id in stored for m in messages_in):
                # A retry of an append that already committed: the originals, no new rows.
                return AppendResult([stored[m.client_msg_id] for m in messages_in], session.last_seq)
            if expected_last_seq is not None and expected_last_seq != session.last_seq:
                raise _moved(expected_last_seq, session.last_seq)
            now = _now()
            seq = session.last_seq
            written: dict[int, Message] = {}
            rows = []
            for i, m in enumerate(messages_in):
                if m.client_msg_id in stored:
                    continue
                seq += 1
                written[i] = Message(seq, Role(m.role), m.content, m.client_msg_id, m.token_count, now)
                rows.append(
                    {
                        "session_pk": session.pk,
                        "seq": seq,
                        "client_msg_id": m.client_msg_id or None,
                        "role": int(m.role),
                        **self._sealed(session, seq, m.content),
                        "token_count": m.token_count,
                        "created_at": now,
                    }
                )
            await conn.execute(sa.insert(messages), rows)
            await conn.execute(
                sa.update(sessions).where(sessions.c.pk == session.pk).values(last_seq=seq, updated_at=now)
            )
        out = [written[i] if i in written else stored[m.client_msg_id] for i, m in enumerate(messages_in)]
        return AppendResult(out, seq)

    async def _by_client_id(
        self, conn: AsyncConnection, session: Any, messages_in: Sequence[NewMessage]
    ) -> dict[str, Message]:
        """Stored messages that share a client_msg_id with `messages_in`."""
        keys = [m.client_msg_id for m in messages_in if m.client_msg_id]
        if not keys:
            return {}
        rows = await conn.execute(
            sa.select(*_MESSAGE_COLUMNS).where(
                messages.c.session_pk == session.pk, messages.c.client_msg_id.in_(keys)
            )
        )
        stored = {row.client_msg_id: self._message(row, session) for row in rows}
        for i, m in enumerate(messages_in):
            original = stored.get(m.client_msg_id)
            if original is not None and (original.role != m.role or original.content != m.content):
                raise AlreadyExists(
                    f"messages[{i}].client_msg_id {m.client_msg_id!r} was already used for a different "
                    f"message (seq {original.seq})"
                )
        return stored

    async def history(self, tenant: str, session_id: str, after_seq: int, limit: int) -> HistoryPage:
        async with self._tx() as conn:
            session = await self._session_row(conn, tenant, session_id)
            rows = await conn.execute(
                sa.select(*_MESSAGE_COLUMNS)
                .where(messages.c.session_pk == session.pk, messages.c.seq > after_seq)
                .order_by(messages.c.seq)
                .limit(limit + 1)
            )
            found = [self._message(row, session) for row in rows]
        return HistoryPage(found[:limit], has_more=len(found) > limit)

    async def window(self, tenant: str, session_id: str, token_budget: int) -> Window:
        async with self._tx() as conn:
            session = await self._session_row(conn, tenant, session_id)
            if token_budget <= 0:
                candidates = await self._all_messages(conn, session)
            else:
                candidates = await self._window_candidates(conn, session, token_budget)
        chosen, truncated = select_window(candidates, token_budget)
        return Window(chosen, session.last_seq, truncated)

    async def _window_candidates(
        self, conn: AsyncConnection, session: Any, token_budget: int
    ) -> list[Message]:
        """Enough of the history for select_window to decide exactly as on all of it:
        the first system message plus newest messages up to the first that cannot fit."""
        system_row = (
            await conn.execute(
                sa.select(*_MESSAGE_COLUMNS)
                .where(messages.c.session_pk == session.pk, messages.c.role == int(Role.SYSTEM))
                .order_by(messages.c.seq)
                .limit(1)
            )
        ).first()
        system = self._message(system_row, session) if system_row is not None else None
        remaining = token_budget - (system.token_count if system is not None else 0)
        found: list[Message] = []
        before: int | None = None
        while True:
            query = sa.select(*_MESSAGE_COLUMNS).where(messages.c.session_pk == session.pk)
            if before is not None:
                query = query.where(messages.c.seq < before)
            batch = [
                self._message(row, session)
                for row in await conn.execute(query.order_by(messages.c.seq.desc()).limit(WINDOW_BATCH))
            ]
            for m in batch:
                found.append(m)
                if system is None or m.seq != system.seq:
                    remaining -= m.token_count
                    if remaining < 0:
                        break
            # Stopping early is exact: the message that did not fit is in `found`,
            # so select_window sees that the history was truncated.
            if remaining < 0 or len(batch) < WINDOW_BATCH:
                break
            before = batch[-1].seq
        if system is not None and all(m.seq != system.seq for m in found):
            found.append(system)
        found.sort(key=lambda m: m.seq)
        return found

    async def _all_messages(self, conn: AsyncConnection, session: Any) -> list[Message]:
        rows = await conn.execute(
            sa.select(*_MESSAGE_COLUMNS).where(messages.c.session_pk == session.pk).order_by(messages.c.seq)
        )
        return [self._message(row, session) for row in rows]

    async def delete_session(self, tenant: str, session_id: str) -> None:
        self.last_seqs.forget(tenant, session_id)
        async with self._tx(write=True) as conn:
            session = await self._session_row(conn, tenant, session_id, lock=True)
            await conn.execute(sa.delete(messages).where(messages.c.session_pk == session.pk))
            await conn.execute(sa.delete(sessions).where(sessions.c.pk == session.pk))

    async def export_user(self, tenant: str, user_id: str) -> AsyncIterator[SessionExport]:
        # One short transaction per session: a slow reader must not hold a connection.
        async with self._tx() as conn:
            rows = await conn.execute(
                sa.select(sessions)
                .where(sessions.c.tenant == tenant, sessions.c.user_id == user_id)
                .order_by(sessions.c.created_at, sessions.c.pk)
            )
            owned = list(rows)
        for row in owned:
            async with self._tx() as conn:
                found = await self._all_messages(conn, row)
            yield SessionExport(_session_info(row), found)

    async def erase_user(self, tenant: str, user_id: str) -> EraseResult:
        owned = sa.select(sessions.c.pk).where(sessions.c.tenant == tenant, sessions.c.user_id == user_id)
        async with self._tx(write=True) as conn:
            # Lock first so that no append slips in between the two deletes.
            await conn.execute(owned.with_for_update())
            erased_messages = (
                await conn.execute(
                    sa.delete(messages).where(messages.c.session_pk.in_(owned.scalar_subquery()))
                )
            ).rowcount
            erased = (
                await conn.execute(
                    sa.delete(sessions)
                    .where(sessions.c.tenant == tenant, sessions.c.user_id == user_id)
                    .returning(sessions.c.id)
                )
            ).scalars()
            session_ids = tuple(erased)
        return EraseResult(len(session_ids), erased_messages, session_ids)

    async def rotate_keys(self, batch_size: int = 500) -> int:
        """Re-seal every message not under the active key (older keys, pre-encryption plaintext)
        with it, one short transaction per batch; returns how many rows were rewritten."""
        if self.keys is None:
            raise FailedPrecondition("no key ring configured")
        rewritten = 0
        stale = sa.or_(messages.c.key_id.is_(None), messages.c.key_id != self.keys.active)
        query = (
            sa.select(messages.c.session_pk, *_MESSAGE_COLUMNS, sessions.c.tenant, sessions.c.id)
            .join(sessions, sessions.c.pk == messages.c.session_pk)
            .where(stale)
            .limit(batch_size)
            .with_for_update(of=messages)
        )
        while True:
            async with self._tx(write=True) as conn:
                rows = (await conn.execute(query)).all()
                for row in rows:
                    # The joined row carries tenant and id, as a sessions row does.
                    content = self._message(row, row).content
                    await conn.execute(
                        sa.update(messages)
                        .where(messages.c.session_pk == row.session_pk, messages.c.seq == row.seq)
                        .values(**self._sealed(row, row.seq, content))
                    )
            if not rows:
                return rewritten
            rewritten += len(rows)

    def _expired(self, now: dt.datetime) -> sa.ColumnElement[bool]:
        """Sessions whose retention has run out at `now` (retention_days 0 keeps a session)."""
        if self._sqlite:
            # SQLite keeps datetimes as text; julianday() counts days, as retention does.
            lapsed = sa.func.julianday(sessions.c.updated_at) + sessions.c.retention_days < sa.func.julianday(
                now.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            )
        else:
            lapsed = sessions.c.updated_at + sa.func.make_interval(0, 0, 0, sessions.c.retention_days) < now
        return sa.and_(sessions.c.retention_days > 0, lapsed)

    async def purge_expired(
        self, now: dt.datetime | None = None, batch_size: int = 500
    ) -> list[tuple[str, str]]:
        """Delete the sessions past their retention with their messages, one batch per
        transaction; returns the (tenant, session id) of each."""
        expired = self._expired(now or _now())
        purged: list[tuple[str, str]] = []
        while True:
            async with self._tx(write=True) as conn:
                # The condition is checked under the lock: an append that just renewed
                # updated_at keeps its session.
                rows = (
                    await conn.execute(
                        sa.select(sessions.c.pk, sessions.c.tenant, sessions.c.id)
                        .where(expired)
                        .limit(batch_size)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
                pks = [row.pk for row in rows]
                if pks:
                    await conn.execute(sa.delete(messages).where(messages.c.session_pk.in_(pks)))
                    await conn.execute(sa.delete(sessions).where(sessions.c.pk.in_(pks)))
            purged.extend((row.tenant, row.id) for row in rows)
            if len(rows) < batch_size:
                return purged
