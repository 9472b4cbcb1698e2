"""History merge and the turn appended after a reply."""

from __future__ import annotations

from services.router.core.domain import ChatRole, ChatTurn, HistoryMessage, NewTurn
from services.router.core.history import merge_history, turns_to_append

SYS = HistoryMessage(ChatRole.SYSTEM, "be brief", "old/0", 3)
U1 = HistoryMessage(ChatRole.USER, "hi", "old/1", 2)
A1 = HistoryMessage(ChatRole.ASSISTANT, "hello", "old/reply", 2)


def test_no_history_leaves_the_request_untouched() -> None:
    new = [ChatTurn(ChatRole.USER, "a"), ChatTurn(ChatRole.SYSTEM, "odd but kept in place")]
    assert merge_history([], new, "r") == new


def test_history_goes_before_the_request_with_system_first() -> None:
    merged = merge_history([SYS, U1, A1], [ChatTurn(ChatRole.USER, "again")], "r")
    assert merged == [
        ChatTurn(ChatRole.SYSTEM, "be brief"),
        ChatTurn(ChatRole.USER, "hi"),
        ChatTurn(ChatRole.ASSISTANT, "hello"),
        ChatTurn(ChatRole.USER, "again"),
    ]


def test_a_system_message_in_the_request_replaces_the_stored_one() -> None:
    new = [ChatTurn(ChatRole.SYSTEM, "be verbose"), ChatTurn(ChatRole.USER, "again")]
    merged = merge_history([SYS, U1, A1], new, "r")
    assert merged[0] == ChatTurn(ChatRole.SYSTEM, "be verbose")
    assert ChatTurn(ChatRole.SYSTEM, "be brief") not in merged
    assert merged[-1] == ChatTurn(ChatRole.USER, "again")


def test_a_retry_does_not_see_its_own_earlier_attempt() -> None:
    own = [
        HistoryMessage(ChatRole.USER, "q", "r/0", 1),
        HistoryMessage(ChatRole.ASSISTANT, "a", "r/reply", 1),
    ]
    merged = merge_history([U1, A1, *own], [ChatTurn(ChatRole.USER, "q")], "r")
    assert merged == [
        ChatTurn(ChatRole.USER, "hi"),
        ChatTurn(ChatRole.ASSISTANT, "hello"),
        ChatTurn(ChatRole.USER, "q"),
    ]


def test_messages_without_role_are_dropped() -> None:
    merged = merge_history([HistoryMessage(None, "?"), U1], [ChatTurn(ChatRole.USER, "x")], "r")
    assert merged == [ChatTurn(ChatRole.USER, "hi"), ChatTurn(ChatRole.USER, "x")]


def test_turn_ids_derive_from_the_request_id() -> None:
    new = [ChatTurn(ChatRole.SYSTEM, "s"), ChatTurn(ChatRole.USER, "u")]
    assert turns_to_append(new, "reply", "req", completion_tokens=4) == [
        NewTurn(ChatRole.SYSTEM, "s", "req/0", 0),  # left for the store to estimate
        NewTurn(ChatRole.USER, "u", "req/1", 0),
        NewTurn(ChatRole.ASSISTANT, "reply", "req/reply", 4),
    ]


def test_a_reply_cut_short_is_marked_by_its_id() -> None:
    turns = turns_to_append(
        [ChatTurn(ChatRole.USER, "u")], "partial", "req", completion_tokens=2, complete=False
    )
    assert turns == [
        NewTurn(ChatRole.USER, "u", "req/0", 0),
        NewTurn(ChatRole.ASSISTANT, "partial", "req/reply-incomplete", 2),
    ]
