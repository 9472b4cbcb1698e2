"""Stop strings: partial matches are held back, the stop itself is trimmed."""

from __future__ import annotations

from services.worker.stop import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(p) for p in pieces]


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher([])
    assert feed_all(m, ["a", "b"]) == ["a", "b"]
    assert not m.stopped


def test_stop_inside_one_piece_is_trimmed_with_what_follows() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello END and more") == "hello "
    assert m.stopped
    assert m.feed("later") == ""


def test_partial_match_is_held_until_resolved_as_stop() -> None:
    m = StopMatcher(["</answer>"])
    out = feed_all(m, ["42 <", "/ans", "wer> tail"])
    assert out == ["42 ", "", ""]
    assert m.stopped


def test_partial_match_is_released_when_it_turns_out_not_a_stop() -> None:
    m = StopMatcher(["</answer>"])
    out = feed_all(m, ["a </an", "chor>"])
    assert out == ["a ", "</anchor>"]
    assert not m.stopped


def test_flush_releases_held_text_at_the_end() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("the ST") == "the "
    assert m.flush() == "ST"


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"


def test_held_back_keeps_longest_possible_prefix() -> None:
    # "aab" could still become "aabc" (stop) even though "ab" alone also prefixes it.
    m = StopMatcher(["aabc", "abx"])
    assert m.feed("xaab") == "x"
    assert m.feed("c") == ""
    assert m.stopped


def test_stop_spanning_many_single_character_pieces() -> None:
    m = StopMatcher(["\n\n"])
    out = feed_all(m, ["line", "\n", "\n", "next"])
    assert "".join(out) == "line"
    assert m.stopped
