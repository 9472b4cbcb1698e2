"""Incremental detokenisation never releases half a character."""

from __future__ import annotations

from collections.abc import Sequence

from services.worker.detokenizer import IncrementalDetokenizer

# A byte-level vocabulary: each token is a few raw bytes, like GPT-2 style BPE.
VOCAB: dict[int, bytes] = {
    0: b"Hello",
    1: b" w",
    2: b"orld",
    3: "é".encode()[:1],
    4: "é".encode()[1:],
    5: "😀".encode()[:2],
    6: "😀".encode()[2:3],
    7: "😀".encode()[3:],
    8: b" ",
    9: b"\xff",  # never valid UTF-8
}


def decode(ids: Sequence[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids: list[int], context: Sequence[int] = ()) -> list[str]:
    d = IncrementalDetokenizer(decode, context)
    return [d.add(i) for i in ids]


def test_plain_tokens_come_out_one_by_one() -> None:
    assert stream([0, 1, 2]) == ["Hello", " w", "orld"]


def test_two_byte_character_waits_for_its_second_token() -> None:
    assert stream([0, 3, 4, 8]) == ["Hello", "", "é", " "]


def test_four_byte_character_split_over_three_tokens() -> None:
    out = stream([5, 6, 7, 1])
    assert out == ["", "", "😀", " w"]
    assert all("\ufffd" not in piece for piece in out)


def test_context_tokens_are_never_released() -> None:
    assert stream([1, 2], context=[0]) == [" w", "orld"]


def test_flush_drops_an_unfinished_character() -> None:
    d = IncrementalDetokenizer(decode)
    assert d.add(0) == "Hello"
    assert d.add(5) == ""
    assert d.flush() == ""


def test_flush_releases_complete_leftovers_only_once() -> None:
    d = IncrementalDetokenizer(decode)
    d.add(0)
    assert d.flush() == ""


def test_concatenated_stream_equals_full_decode() -> None:
    ids = [0, 3, 4, 5, 6, 7, 1, 2, 8, 3, 4]
    d = IncrementalDetokenizer(decode)
    text = "".join(d.add(i) for i in ids) + d.flush()
    assert text == decode(ids)


def test_invalid_byte_followed_by_text_is_released_not_stuck() -> None:
    d = IncrementalDetokenizer(decode)
    out = [d.add(9), d.add(0)]
    assert out[0] == ""
    assert out[1].endswith("Hello")
