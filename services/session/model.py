"""Plain values the session core works with; protobuf stays in convert.py."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Role(enum.IntEnum):
    """Same numbers as infermesh.common.v1.Role."""

    UNSPECIFIED = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    TOOL = 4


@dataclass(frozen=True, slots=True)
class NewSession:
    tenant: str
    user_id: str
    model: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    retention_days: int = 0
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    tenant: str
    user_id: str
    model: str
    created_at: dt.datetime
    updated_at: dt.datetime
    metadata: Mapping[str, str]
    last_seq: int
    retention_days: int


@dataclass(frozen=True, slots=True)
class NewMessage:
    # An int, not a Role: unknown values from newer clients must reach validation.
    role: int
    content: str
    client_msg_id: str = ""
    token_count: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    role: Role
    content: str
    client_msg_id: str
    token_count: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AppendResult:
    messages: list[Message]
    last_seq: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[Message]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Window:
    messages: list[Message]
    last_seq: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class SessionExport:
    session: SessionInfo
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class EraseResult:
    sessions_erased: int
    messages_erased: int
    # Ids of the erased sessions, so that caches can drop them.
    session_ids: tuple[str, ...] = ()
