"""Session history around a Generate call: what goes before the request, what gets appended.

Appended messages carry client_msg_ids derived from the request id, so a retried request
neither duplicates the turn nor sees its own earlier attempt in the history.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.router.core.domain import ChatRole, ChatTurn, HistoryMessage, NewTurn


def msg_id_prefix(request_id: str) -> str:
    return f"{request_id}/"


def merge_history(
    window: Sequence[HistoryMessage], new: Sequence[ChatTurn], request_id: str
) -> list[ChatTurn]:
    """The conversation the worker sees: system prompt, past turns, then the request's messages.

    Chat templates want the system prompt first, so system messages lead; a system message
    in the request replaces the stored one for this call.
    """
    prefix = msg_id_prefix(request_id)
    past = [m for m in window if m.role is not None and not m.client_msg_id.startswith(prefix)]
    if not past:
        return list(new)
    new_system = [t for t in new if t.role is ChatRole.SYSTEM]
    old_system = (
        [] if new_system else [ChatTurn(m.role, m.content) for m in past if m.role is ChatRole.SYSTEM]
    )
    old_rest = [ChatTurn(m.role, m.content) for m in past if m.role is not ChatRole.SYSTEM]
    new_rest = [t for t in new if t.role is not ChatRole.SYSTEM]
    return [*old_system, *new_system, *old_rest, *new_rest]


# client_msg_id suffix of a reply the client stopped (cancelled, or its deadline passed) before
# it ended: the stored text is what was delivered up to then.
REPLY = "reply"
INCOMPLETE_REPLY = "reply-incomplete"


def turns_to_append(
    new: Sequence[ChatTurn], reply: str, request_id: str, completion_tokens: int, *, complete: bool = True
) -> list[NewTurn]:
    """The request's messages and the reply, ready for one AppendMessages call.

    The reply's token count is exact (the worker's usage, or the tokens delivered). The
    prompt's usage covers the template and the history too, so the request's messages are left
    for the store to estimate (0). A reply cut short is marked by its client_msg_id.
    """
    prefix = msg_id_prefix(request_id)
    turns = [
        NewTurn(turn.role, turn.content, f"{prefix}{i}")
        for i, turn in enumerate(new)
        if turn.role is not None
    ]
    suffix = REPLY if complete else INCOMPLETE_REPLY
    turns.append(NewTurn(ChatRole.ASSISTANT, reply, f"{prefix}{suffix}", completion_tokens))
    return turns
