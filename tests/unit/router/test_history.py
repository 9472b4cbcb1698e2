"""History merge and the turn appended after a reply."""

from __future__ import annotations

from services.router.domain import ChatTurn, HistoryMessage, NewTurn, Role
from services.router.history import merge_history, turns_to_append

SYS = HistoryMessage(Role.SYSTEM, "be brief", "old/0", 3)
U1 = HistoryMessage(Role.USER, "hi", "old/1", 2)
A1 = HistoryMessage(Role.ASSISTANT, "hello", "old/reply", 2)


def test_no_history_leaves_the_request_untouched() -> None:
    new = [ChatTurn(Role.USER, "a"), ChatTurn(Role.SYSTEM, "odd but kept in place")]
    assert merge_history([], new, "r") == new


def test_history_goes_before_the_request_with_system_first() -> None:
    merged = merge_history([SYS, U1, A1], [ChatTurn(Role.USER, "again")], "r")
    assert merged == [
        ChatTurn(Role.SYSTEM, "be brief"),
        ChatTurn(Role.USER, "hi"),
        ChatTurn(Role.ASSISTANT, "hello"),
        ChatTurn(Role.USER, "again"),
    ]


def test_a_system_message_in_the_request_replaces_the_stored_one() -> None:
    new = [ChatTurn(Role.SYSTEM, "be verbose"), ChatTurn(Role.USER, "again")]
    merged = merge_history([SYS, U1, A1], new, "r")
    assert merged[0] == ChatTurn(Role.SYSTEM, "be verbose")
    assert ChatTurn(Role.SYSTEM, "be brief") not in merged
    assert merged[-1] == ChatTurn(Role.USER, "again")


def test_a_retry_does_not_see_its_own_earlier_attempt() -> None:
    own = [HistoryMessage(Role.USER, "q", "r/0", 1), HistoryMessage(Role.ASSISTANT, "a", "r/reply", 1)]
    merged = merge_history([U1, A1, *own], [ChatTurn(Role.USER, "q")], "r")
    assert merged == [ChatTurn(Role.USER, "hi"), ChatTurn(Role.ASSISTANT, "hello"), ChatTurn(Role.USER, "q")]


def test_messages_without_role_are_dropped() -> None:
    merged = merge_history([HistoryMessage(None, "?"), U1], [ChatTurn(Role.USER, "x")], "r")
    assert merged == [ChatTurn(Role.USER, "hi"), ChatTurn(Role.USER, "x")]


def test_turn_ids_derive_from_the_request_id() -> None:
    new = [ChatTurn(Role.SYSTEM, "s"), ChatTurn(Role.USER, "u")]
    assert turns_to_append(new, "reply", "req", completion_tokens=4) == [
        NewTurn(Role.SYSTEM, "s", "req/0", 0),  # left for the store to estimate
        NewTurn(Role.USER, "u", "req/1", 0),
        NewTurn(Role.ASSISTANT, "reply", "req/reply", 4),
    ]


def test_a_reply_cut_short_is_marked_by_its_id() -> None:
    turns = turns_to_append([ChatTurn(Role.USER, "u")], "partial", "req", completion_tokens=2, complete=False)
    assert turns == [
        NewTurn(Role.USER, "u", "req/0", 0),
        NewTurn(Role.ASSISTANT, "partial", "req/reply-incomplete", 2),
    ]
