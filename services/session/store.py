"""The storage interface the servicer talks to; SqlStore implements it, a cache can wrap it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from services.session.model import (
    AppendResult,
    EraseResult,
    HistoryPage,
    NewMessage,
    NewSession,
    SessionExport,
    SessionInfo,
    Window,
)


class Store(Protocol):
    """Session history scoped by tenant: another tenant's session is NotFound.

    Inputs are already validated. Errors are domain errors: NotFound, AlreadyExists,
    Aborted (expected_last_seq mismatch or a conflicting write), Unavailable
    (the database cannot be reached in time).
    """

    async def ping(self) -> None: ...

    async def create_session(self, new: NewSession) -> SessionInfo:
        """A retried create of the same id, user and model returns the existing session."""
        ...

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo: ...

    async def append(
        self,
        tenant: str,
        session_id: str,
        messages: Sequence[NewMessage],
        expected_last_seq: int | None = None,
    ) -> AppendResult:
        """All messages in one transaction with consecutive seqs.

        Messages whose client_msg_id is already stored are not written again:
        the stored originals come back in their place.
        """
        ...

    async def history(self, tenant: str, session_id: str, after_seq: int, limit: int) -> HistoryPage: ...

    async def window(self, tenant: str, session_id: str, token_budget: int) -> Window: ...

    async def delete_session(self, tenant: str, session_id: str) -> None: ...

    def export_user(self, tenant: str, user_id: str) -> AsyncIterator[SessionExport]: ...

    async def erase_user(self, tenant: str, user_id: str) -> EraseResult: ...

    async def purge_expired(
        self, now: dt.datetime | None = None, batch_size: int = 500
    ) -> list[tuple[str, str]]:
        """Delete sessions past their retention; returns their (tenant, session id)."""
        ...

    async def close(self) -> None: ...
