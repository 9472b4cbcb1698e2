"""Checks on requests before they reach the store; errors name the field and the limit."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.session.model import NewMessage, NewSession, Role
from services.session.window import estimate_tokens

MAX_TENANT_CHARS = 128
MAX_USER_ID_CHARS = 256
MAX_MODEL_CHARS = 128
MAX_CLIENT_MSG_ID_CHARS = 128
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4096
MAX_RETENTION_DAYS = 36_500
MAX_TOKEN_COUNT = 1 << 24
# Seqs are stored as signed 64-bit integers.
MAX_SEQ = (1 << 63) - 1

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_VALID_ROLES = frozenset(r.value for r in Role if r is not Role.UNSPECIFIED)
_ROLES = ", ".join(f"ROLE_{r.name}" for r in Role if r is not Role.UNSPECIFIED)


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 100_000
    max_messages_per_append: int = 256
    default_page_size: int = 100
    max_page_size: int = 1000


def _bounded(field: str, value: str, limit: int, *, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")


def check_tenant(tenant: str) -> None:
    # The router always sets it; an empty one would pool every caller's sessions together.
    _bounded("tenant", tenant, MAX_TENANT_CHARS)


def check_session_ref(tenant: str, session_id: str) -> None:
    check_tenant(tenant)
    if not session_id:
        raise InvalidArgument("session_id", "is required")
    _check_session_id(session_id)


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_RE.fullmatch(session_id):
        raise InvalidArgument(
            "session_id",
            "must be 1 to 128 characters of letters, digits and ._:- starting with a letter or digit",
        )


def check_user_ref(tenant: str, user_id: str) -> None:
    check_tenant(tenant)
    _bounded("user_id", user_id, MAX_USER_ID_CHARS)


def normalize_new_session(new: NewSession) -> NewSession:
    """Validate a CreateSession request; generates the id when the client gave none."""
    check_user_ref(new.tenant, new.user_id)
    _bounded("model", new.model, MAX_MODEL_CHARS, required=False)
    if new.retention_days > MAX_RETENTION_DAYS:
        raise InvalidArgument("retention_days", f"must be <= {MAX_RETENTION_DAYS}, got {new.retention_days}")
    if len(new.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            "metadata", f"must have at most {MAX_METADATA_ENTRIES} entries, got {len(new.metadata)}"
        )
    for key, value in new.metadata.items():
        _bounded("metadata key", key, MAX_METADATA_KEY_CHARS)
        _bounded(f"metadata[{key!r}]", value, MAX_METADATA_VALUE_CHARS, required=False)
    if new.session_id:
        _check_session_id(new.session_id)
        return new
    return dataclasses.replace(new, session_id=str(uuid.uuid4()))


def normalize_messages(messages: Sequence[NewMessage], limits: Limits) -> list[NewMessage]:
    """Validate messages to append; fills in a token estimate where the caller gave none."""
    if not messages:
        raise InvalidArgument("messages", "must contain at least one message")
    if len(messages) > limits.max_messages_per_append:
        raise InvalidArgument(
            "messages", f"must contain at most {limits.max_messages_per_append} messages, got {len(messages)}"
        )
    seen: dict[str, int] = {}
    out: list[NewMessage] = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if m.role not in _VALID_ROLES:
            raise InvalidArgument(f"{field}.role", f"must be one of {_ROLES}, got {m.role}")
        if len(m.content) > limits.max_message_chars:
            raise InvalidArgument(
                f"{field}.content",
                f"must be at most {limits.max_message_chars} characters, got {len(m.content)}",
            )
        _bounded(f"{field}.client_msg_id", m.client_msg_id, MAX_CLIENT_MSG_ID_CHARS, required=False)
        if m.client_msg_id:
            if m.client_msg_id in seen:
                raise InvalidArgument(
                    f"{field}.client_msg_id", f"repeats messages[{seen[m.client_msg_id]}].client_msg_id"
                )
            seen[m.client_msg_id] = i
        if m.token_count > MAX_TOKEN_COUNT:
            raise InvalidArgument(
                f"{field}.token_count", f"must be <= {MAX_TOKEN_COUNT}, got {m.token_count}"
            )
        tokens = m.token_count or estimate_tokens(m.content)
        out.append(NewMessage(Role(m.role), m.content, m.client_msg_id, tokens))
    return out


def check_seq(field: str, value: int) -> None:
    if value > MAX_SEQ:
        raise InvalidArgument(field, f"must be <= {MAX_SEQ}, got {value}")


def page_size(requested: int, limits: Limits) -> int:
    """0 means the default page size."""
    if requested > limits.max_page_size:
        raise InvalidArgument("page_size", f"must be <= {limits.max_page_size}, got {requested}")
    return requested or limits.default_page_size
