"""A sequence's stream: what it sends per token, and when and why it finishes."""

from __future__ import annotations

from collections.abc import Sequence

from services.worker.request import SamplingParams
from services.worker.sequence import Delta, Finish, GenSequence

EOS = 0
# Token i decodes to WORDS[i]; 9 and 10 are the two halves of "é".
WORDS = {
    1: b"The",
    2: b" cat",
    3: b" sat",
    4: b".",
    5: b" END",
    6: b" E",
    7: b"ND",
    8: b" on",
    9: b"\xc3",
    10: b"\xa9",
}


def decode(ids: Sequence[int]) -> str:
    return b"".join(WORDS.get(i, b"") for i in ids).decode("utf-8", errors="replace")


def make_seq(max_new: int = 10, **kwargs: object) -> GenSequence:
    options: dict[str, object] = {
        "request_id": "r",
        "prompt_ids": [1, 2],
        "resume_ids": [],
        "sampling": SamplingParams(),
        "seed": 0,
        "max_new_tokens": max_new,
        "decode": decode,
        "eos_ids": [EOS],
    }
    options.update(kwargs)
    return GenSequence(**options)  # type: ignore[arg-type]


def run(seq: GenSequence, tokens: list[int]) -> list[Delta]:
    out = []
    for t in tokens:
        delta = seq.append(t, -0.5)
        if delta is not None:
            out.append(delta)
        if seq.finish is not None:
            break
    return out


def test_each_token_streams_its_text_and_length_finishes() -> None:
    deltas = run(make_seq(max_new=3), [2, 3, 4, 8])
    assert [d.text for d in deltas] == [" cat", " sat", "."]
    assert deltas[-1].finish is Finish.LENGTH
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert deltas[-1].usage.prompt_tokens == 2


def test_eos_finishes_with_stop_and_adds_no_text() -> None:
    deltas = run(make_seq(), [2, EOS, 3])
    assert [d.text for d in deltas] == [" cat", ""]
    assert deltas[-1].token_ids == [EOS]
    assert deltas[-1].finish is Finish.STOP


def test_ignore_eos_keeps_going() -> None:
    seq = make_seq(max_new=3, sampling=SamplingParams(ignore_eos=True))
    deltas = run(seq, [2, EOS, 3])
    assert deltas[-1].finish is Finish.LENGTH
    assert seq.output_ids == [2, EOS, 3]


def test_stop_token_ids_finish() -> None:
    deltas = run(make_seq(stop_token_ids=[3]), [2, 3, 4])
    assert deltas[-1].finish is Finish.STOP
    assert "".join(d.text for d in deltas) == " cat"


def test_stop_string_split_across_tokens_is_held_then_dropped() -> None:
    seq = make_seq(stop=[" END"])
    deltas = run(seq, [2, 6, 7, 3])
    assert "".join(d.text for d in deltas) == " cat"
    assert deltas[-1].finish is Finish.STOP
    # The held-back tokens still travel, with the final delta.
    assert deltas[-1].token_ids == [6, 7]


def test_held_back_prefix_released_at_length() -> None:
    deltas = run(make_seq(max_new=2, stop=[" END"]), [2, 6])
    assert "".join(d.text for d in deltas) == " cat E"


def test_token_ids_travel_with_their_text() -> None:
    deltas = run(make_seq(max_new=4), [3, 9, 10, 4])
    assert [(d.text, d.token_ids) for d in deltas] == [(" sat", [3]), ("é", [9, 10]), (".", [4])]


def test_first_token_goes_out_at_once_even_without_text() -> None:
    # Half a character: its text waits for the next token, its id does not (time to first token).
    deltas = run(make_seq(max_new=3), [9, 10, 4])
    assert [(d.text, d.token_ids) for d in deltas] == [("", [9]), ("é", [10]), (".", [4])]


def test_logprobs_only_when_asked() -> None:
    plain = run(make_seq(max_new=1), [2])
    asked = run(make_seq(max_new=1, sampling=SamplingParams(logprobs=True)), [2])
    assert plain[0].logprobs == []
    assert asked[0].logprobs == [-0.5]


def test_resumed_tokens_count_and_set_step_index() -> None:
    seq = make_seq(resume_ids=[2, 3], max_new_tokens=2)
    assert seq.step_index == 2
    assert seq.prefix_ids == [1, 2, 2, 3]
    deltas = run(seq, [4, 8])
    assert deltas[0].text == "."  # resumed text is not sent again
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 4


def test_cancel_ends_with_cancelled() -> None:
    seq = make_seq()
    run(seq, [2])
    assert seq.end(Finish.CANCELLED).finish is Finish.CANCELLED
    assert seq.finish is Finish.CANCELLED
