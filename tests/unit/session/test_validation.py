"""Request validation: every refusal names the field and the limit."""

from __future__ import annotations

import uuid

import pytest

from services.common.errors import InvalidArgument
from services.session import validation
from services.session.model import NewMessage, NewSession, Role
from services.session.validation import Limits

LIMITS = Limits(max_message_chars=10, max_messages_per_append=3, default_page_size=20, max_page_size=100)


def refused(call, *args) -> str:
    with pytest.raises(InvalidArgument) as info:
        call(*args)
    return info.value.message


def test_new_session_gets_a_generated_id():
    out = validation.normalize_new_session(NewSession("t", "u", "m", {"a": "b"}, 3))
    assert uuid.UUID(out.session_id).version == 4
    assert (out.tenant, out.user_id, out.model, dict(out.metadata), out.retention_days) == (
        "t",
        "u",
        "m",
        {"a": "b"},
        3,
    )


def test_new_session_keeps_a_client_id():
    assert validation.normalize_new_session(
        NewSession("t", "u", "m", session_id="chat:1.a-b_c")
    ).session_id == ("chat:1.a-b_c")


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (NewSession("", "u", "m"), "tenant: is required"),
        (NewSession("t" * 129, "u", "m"), "tenant: must be at most 128 characters, got 129"),
        (NewSession("t", "", "m"), "user_id: is required"),
        (NewSession("t", "u" * 257, "m"), "user_id: must be at most 256 characters"),
        (NewSession("t", "u", "m" * 129), "model: must be at most 128 characters"),
        (NewSession("t", "u", "m", retention_days=36_501), "retention_days: must be <= 36500, got 36501"),
        (
            NewSession("t", "u", "m", {str(i): "" for i in range(65)}),
            "metadata: must have at most 64 entries",
        ),
        (NewSession("t", "u", "m", {"": "v"}), "metadata key: is required"),
        (NewSession("t", "u", "m", {"k": "v" * 4097}), "metadata['k']: must be at most 4096 characters"),
        (NewSession("t", "u", "m", session_id="-leading"), "session_id: must be 1 to 128 characters"),
        (NewSession("t", "u", "m", session_id="a" * 129), "session_id: must be 1 to 128 characters"),
        (NewSession("t", "u", "m", session_id="a/b"), "session_id: must be 1 to 128 characters"),
    ],
)
def test_bad_new_session(new, expected):
    assert expected in refused(validation.normalize_new_session, new)


def test_messages_are_normalised():
    out = validation.normalize_messages(
        [NewMessage(1, "sys", "", 7), NewMessage(2, "12345678", "c-1"), NewMessage(3, "")], LIMITS
    )
    assert [m.role for m in out] == [Role.SYSTEM, Role.USER, Role.ASSISTANT]
    assert all(isinstance(m.role, Role) for m in out)
    # A given count is kept; a missing one is estimated from the content.
    assert [m.token_count for m in out] == [7, 2, 0]
    assert [m.client_msg_id for m in out] == ["", "c-1", ""]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "messages: must contain at least one message"),
        ([NewMessage(2, "x")] * 4, "messages: must contain at most 3 messages, got 4"),
        (
            [NewMessage(0, "x")],
            "messages[0].role: must be one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL",
        ),
        ([NewMessage(2, "x"), NewMessage(42, "x")], "messages[1].role: must be one of"),
        ([NewMessage(2, "x" * 11)], "messages[0].content: must be at most 10 characters, got 11"),
        ([NewMessage(2, "x", "k" * 129)], "messages[0].client_msg_id: must be at most 128 characters"),
        (
            [NewMessage(2, "a", "k"), NewMessage(2, "b", "k")],
            "messages[1].client_msg_id: repeats messages[0]",
        ),
        ([NewMessage(2, "x", "", (1 << 24) + 1)], "messages[0].token_count: must be <= 16777216"),
    ],
)
def test_bad_messages(messages, expected):
    assert expected in refused(validation.normalize_messages, messages, LIMITS)


def test_page_size():
    assert validation.page_size(0, LIMITS) == 20
    assert validation.page_size(100, LIMITS) == 100
    assert refused(validation.page_size, 101, LIMITS) == "page_size: must be <= 100, got 101"


def test_session_refs_and_seqs():
    validation.check_session_ref("t", "s-1")
    assert refused(validation.check_session_ref, "t", "") == "session_id: is required"
    assert refused(validation.check_session_ref, "", "s-1") == "tenant: is required"
    assert refused(validation.check_user_ref, "t", "") == "user_id: is required"
    validation.check_seq("after_seq", (1 << 63) - 1)
    assert "after_seq: must be <=" in refused(validation.check_seq, "after_seq", 1 << 63)
