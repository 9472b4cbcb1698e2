"""History merge and the turn appended after a reply."""

from __future__ import annotations

from services.router.domain import ChatTurn, HistoryMessage, NewTurn, Role
from services.router.history import history_tokens, merge_history, turns_to_append

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
    assert history_tokens([U1, A1, *own], "r") == 4


def test_messages_without_role_are_dropped() -> None:
    merged = merge_history([HistoryMessage(None, "?"), U1], [ChatTurn(Role.USER, "x")], "r")
    assert merged == [ChatTurn(Role.USER, "hi"), ChatTurn(Role.USER, "x")]


def test_history_tokens_unknown_when_a_count_is_missing() -> None:
    assert history_tokens([SYS, U1, A1], "r") == 7
    assert history_tokens([U1, HistoryMessage(Role.ASSISTANT, "x", "old/2", 0)], "r") is None
    assert history_tokens([], "r") == 0


def test_turn_ids_derive_from_the_request_id() -> None:
    new = [ChatTurn(Role.SYSTEM, "s"), ChatTurn(Role.USER, "u")]
    turns = turns_to_append(new, "reply", "req", prompt_tokens=30, completion_tokens=4, past_tokens=10)
    assert turns == [
        NewTurn(Role.SYSTEM, "s", "req/0", 0),  # two new messages: the split is unknown
        NewTurn(Role.USER, "u", "req/1", 0),
        NewTurn(Role.ASSISTANT, "reply", "req/reply", 4),
    ]


def test_a_lone_message_gets_the_prompt_tokens_the_history_did_not_use() -> None:
    turns = turns_to_append([ChatTurn(Role.USER, "u")], "r", "q", 30, 4, past_tokens=10)
    assert turns[0].token_count == 20
    unknown = turns_to_append([ChatTurn(Role.USER, "u")], "r", "q", 30, 4, past_tokens=None)
    assert unknown[0].token_count == 0
