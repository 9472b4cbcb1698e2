"""Scheduler: token budget, chunked prefill, prefix hits, preemption, admission and cancellation."""

from __future__ import annotations

import pytest

from services.worker.core.scheduler import QueueFull, SchedulerOutput, SequenceTooLong
from services.worker.core.seq_state import FinishReason, SeqState, SeqStatus
from tests.unit.worker.core.builders import (
    check_invariants,
    fake_sampled,
    make_requests,
    make_scheduler,
    run_until_idle,
    step,
)


def chunk_of(out: SchedulerOutput, request_id: str) -> tuple[int, int, bool] | None:
    for c in out.chunks:
        if c.request_id == request_id:
            return c.start, len(c.token_ids), c.sample
    return None


def test_every_step_fits_the_token_budget_and_all_requests_finish() -> None:
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=32)
    seqs = make_requests(10, prompt_len=30, max_new_tokens=5)
    for seq in seqs:
        sched.add(seq)
    outputs = run_until_idle(sched)
    assert all(0 < out.num_tokens <= 32 for out in outputs)
    # Prompt tokens plus every generated token but the last pass through the model exactly once.
    assert sum(out.num_tokens for out in outputs) == 10 * (30 + 5 - 1)
    assert all(s.finish_reason is FinishReason.LENGTH and s.output_ids == [7] * 5 for s in seqs)
    assert sched.blocks.num_used_blocks == 0


def test_long_prompt_is_prefilled_in_chunks_at_the_right_positions() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    [seq] = make_requests(1, prompt_len=50, max_new_tokens=3)
    sched.add(seq)
    chunks = [chunk_of(step(sched)[0], seq.request_id) for _ in range(6)]
    assert chunks == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
        (50, 1, True),
        (51, 1, True),
    ]
    assert seq.status is SeqStatus.FINISHED and seq.num_output_tokens == 3


def test_chunk_tokens_and_block_table_cover_the_positions() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=6)
    [seq] = make_requests(1, prompt_len=9, max_new_tokens=4)
    sched.add(seq)
    out, _ = step(sched)
    [c] = out.chunks
    assert c.token_ids == tuple(seq.token_ids[:6]) and len(c.block_table) == 2
    out, _ = step(sched)
    [c] = out.chunks
    assert (c.start, c.token_ids) == (6, tuple(seq.token_ids[6:9])) and len(c.block_table) == 3
    # The decode step feeds back the token sampled at the end of the prompt.
    out, _ = step(sched, token=lambda _: 42)
    [c] = out.chunks
    assert (c.start, c.token_ids) == (9, (7,))
    out, _ = step(sched)
    assert out.chunks[0].token_ids == (42,)


def test_decodes_and_a_prefill_chunk_share_a_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    first, second = make_requests(2, prompt_len=8, max_new_tokens=10)
    sched.add(first)
    step(sched)
    sched.add(second)
    [long] = make_requests(1, prompt_len=40, max_new_tokens=2)
    sched.add(long)
    out, _ = step(sched)
    assert chunk_of(out, first.request_id) == (8, 1, True)
    assert chunk_of(out, second.request_id) == (0, 8, True)
    assert chunk_of(out, long.request_id) == (0, 7, False)
    assert out.num_tokens == 16


def test_prefill_chunk_cap_leaves_room_for_another_prompt() -> None:
    sched = make_scheduler(max_num_batched_tokens=32, max_prefill_chunk=12)
    a, b = make_requests(2, prompt_len=40)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert chunk_of(out, a.request_id) == (0, 12, False)
    assert chunk_of(out, b.request_id) == (0, 12, False)


def test_second_turn_reuses_the_first_turns_blocks() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    [turn1] = make_requests(1, prompt_len=20, max_new_tokens=6)
    sched.add(turn1)
    step(sched)
    blocks_of_turn1 = []
    while turn1.status is not SeqStatus.FINISHED:
        blocks_of_turn1 = list(turn1.block_table)
        step(sched, token=lambda _: 5)
    assert sched.blocks.num_used_blocks == 0
    history = turn1.token_ids  # prompt + answer
    turn2 = SeqState.new("turn-2", [*history, 900, 901, 902, 903, 904], max_new_tokens=4)
    sched.add(turn2)
    out, _ = step(sched)
    # The answer's last token was never fed to the model: 25 positions computed, 6 full blocks cached.
    assert turn2.num_cached_tokens == 24
    assert turn2.block_table[:6] == blocks_of_turn1[:6]
    assert chunk_of(out, "turn-2") == (24, len(history) + 5 - 24, True)
    assert sched.blocks.prefix_hit_rate > 0


def test_without_prefix_caching_the_second_turn_starts_from_zero() -> None:
    sched = make_scheduler(block_size=4, prefix_caching=False)
    [turn1] = make_requests(1, prompt_len=20, max_new_tokens=3)
    sched.add(turn1)
    run_until_idle(sched)
    turn2 = SeqState.new("turn-2", [*turn1.token_ids, 900], max_new_tokens=2)
    sched.add(turn2)
    out, _ = step(sched)
    assert turn2.num_cached_tokens == 0 and chunk_of(out, "turn-2") == (0, 24, True)


def test_identical_prompts_share_blocks_once_computed() -> None:
    sched = make_scheduler(block_size=4)
    prompt = list(range(100, 117))
    a = SeqState.new("a", prompt, 4)
    sched.add(a)
    step(sched)
    b = SeqState.new("b", prompt, 4)
    sched.add(b)
    step(sched)
    assert b.num_cached_tokens == 16
    assert b.block_table[:4] == a.block_table[:4]
    assert all(sched.blocks.blocks[i].ref_count == 2 for i in a.block_table[:4])


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    sched = make_scheduler(block_size=4)
    prompt = list(range(100, 116))
    sched.add(SeqState.new("a", prompt, 1))
    run_until_idle(sched)
    sched.add(SeqState.new("b", prompt, 1))
    out, _ = step(sched)
    assert chunk_of(out, "b") == (12, 4, True)


def test_out_of_blocks_preempts_the_latest_and_resumes_it_first() -> None:
    # 3 sequences of 4 prompt tokens with block_size 4: each needs a 2nd block at its first decode.
    sched = make_scheduler(num_blocks=5, block_size=4, prefix_caching=False)
    a, b, c = make_requests(3, prompt_len=4, max_new_tokens=6)
    for seq in (a, b, c):
        sched.add(seq)
    step(sched)  # prefill all three: 3 blocks used
    [d] = make_requests(1, prompt_len=4, max_new_tokens=2)
    sched.add(d)
    out, _ = step(sched)
    # a and b take the last two blocks; c must go, and nothing new is admitted in that step.
    assert out.preempted == (c.request_id,)
    assert [ch.request_id for ch in out.chunks] == [a.request_id, b.request_id]
    assert list(sched.waiting) == [c, d]
    assert c.block_table == [] and c.num_preemptions == 1 and c.output_ids == [7]
    # c recomputes prompt + its token when it comes back, before d.
    while c.status is SeqStatus.WAITING:
        out, _ = step(sched)
        assert chunk_of(out, d.request_id) is None or c.status is not SeqStatus.WAITING
    assert chunk_of(out, c.request_id) == (0, 5, True)
    run_until_idle(sched)
    assert [s.num_output_tokens for s in (a, b, c, d)] == [6, 6, 6, 2]
    assert sched.blocks.num_used_blocks == 0


def test_a_sequence_alone_never_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    [seq] = make_requests(1, prompt_len=10, max_new_tokens=7)  # 16 positions: exactly 4 blocks
    sched.add(seq)
    outputs = run_until_idle(sched)
    assert not any(out.preempted for out in outputs)
    assert seq.num_output_tokens == 7


def test_stop_token_finishes_early() -> None:
    sched = make_scheduler()
    [seq] = make_requests(1, max_new_tokens=8, stop_token_ids=[2])
    sched.add(seq)
    step(sched, token=lambda _: 5)
    _, finished = step(sched, token=lambda _: 2)
    assert finished == [seq]
    assert seq.finish_reason is FinishReason.STOP and seq.output_ids == [5, 2]
    assert not sched.has_work() and sched.get(seq.request_id) is None


def test_running_sequences_are_bounded() -> None:
    sched = make_scheduler(num_blocks=256, max_num_seqs=3, max_num_batched_tokens=1000)
    for seq in make_requests(5, max_new_tokens=3):
        sched.add(seq)
    out, _ = step(sched)
    assert len(out.chunks) == 3 and sched.num_running == 3 and sched.num_waiting == 2


def test_waiting_queue_is_bounded() -> None:
    sched = make_scheduler(max_waiting=2)
    a, b, c = make_requests(3)
    sched.add(a)
    sched.add(b)
    with pytest.raises(QueueFull, match=r"2 sequences already waiting \(limit 2\)"):
        sched.add(c)
    step(sched)
    sched.add(c)  # room again once the others run


def test_a_sequence_that_can_never_fit_is_refused() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    [seq] = make_requests(1, prompt_len=10, max_new_tokens=8)
    with pytest.raises(SequenceTooLong, match="need 17 cache positions; the KV cache holds 16"):
        sched.add(seq)
    assert not sched.has_work()


def test_duplicate_request_id_is_refused() -> None:
    sched = make_scheduler()
    sched.add(SeqState.new("x", [1, 2], 2))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(SeqState.new("x", [3, 4], 2))


def test_200_cancelled_requests_leave_no_block_used() -> None:
    sched = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=64, max_num_batched_tokens=256)
    seqs = make_requests(200, prompt_len=12, max_new_tokens=50)
    for seq in seqs:
        sched.add(seq)
    for _ in range(5):
        step(sched)
    assert sched.blocks.num_used_blocks > 0 and sched.num_running > 0 and sched.num_waiting > 0
    for seq in seqs:
        assert sched.finish(seq.request_id) is seq
        check_invariants(sched)
    assert sched.blocks.num_used_blocks == 0
    assert not sched.has_work()
    assert all(s.finish_reason is FinishReason.CANCELLED for s in seqs)


def test_cancel_during_a_step_frees_at_once_and_the_result_is_dropped() -> None:
    sched = make_scheduler()
    [seq] = make_requests(1)
    sched.add(seq)
    out = sched.schedule()
    sched.finish(seq.request_id)
    assert sched.blocks.num_used_blocks == 0
    # A new request under the same id must not receive the old one's result.
    again = SeqState.new(seq.request_id, [1, 2, 3], 2)
    sched.add(again)
    assert sched.update_from_output(out, fake_sampled(out)) == []
    assert again.num_computed_tokens == 0 and again.output_ids == []
    check_invariants(sched)


def test_finish_of_an_unknown_request_is_a_no_op() -> None:
    assert make_scheduler().finish("nope") is None


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    sched = make_scheduler(max_num_seqs=1)
    [batch] = make_requests(1, priority=4)
    [standard_1, standard_2] = make_requests(2, priority=3)
    [critical] = make_requests(1, priority=1)
    for seq in (batch, standard_1, critical, standard_2):
        sched.add(seq)
    assert [s.request_id for s in sched.waiting] == [
        s.request_id for s in (critical, standard_1, standard_2, batch)
    ]


def test_an_urgent_prefill_runs_without_the_lower_priority_sequences() -> None:
    sched = make_scheduler()
    background = make_requests(3, prompt_len=6, max_new_tokens=20, priority=4)
    for seq in background:
        sched.add(seq)
    step(sched)
    [urgent] = make_requests(1, prompt_len=12, max_new_tokens=3, priority=2)
    [late] = make_requests(1, prompt_len=6, priority=3)
    sched.add(urgent)
    sched.add(late)
    out, _ = step(sched)
    # Its own step: no decodes of the others, no other prefill to lengthen it.
    assert [c.request_id for c in out.chunks] == [urgent.request_id]
    out, _ = step(sched)
    # First token out: everyone runs together again.
    assert {c.request_id for c in out.chunks} == {s.request_id for s in (*background, urgent, late)}


def test_urgent_steps_are_bounded_so_the_others_never_starve() -> None:
    sched = make_scheduler(max_num_batched_tokens=4, max_urgent_steps=2)
    [background] = make_requests(1, prompt_len=3, max_new_tokens=20, priority=3)
    sched.add(background)
    step(sched)
    # A long urgent prompt takes several chunks; every third step runs the background one too.
    [urgent] = make_requests(1, prompt_len=24, max_new_tokens=2, priority=1)
    sched.add(urgent)
    ran_background = [
        background.request_id in {c.request_id for c in step(sched)[0].chunks} for _ in range(6)
    ]
    assert ran_background == [False, False, True, False, False, True]


def test_urgent_steps_can_be_turned_off() -> None:
    sched = make_scheduler(urgent_priority=0)
    [background] = make_requests(1, prompt_len=3, max_new_tokens=20, priority=4)
    sched.add(background)
    step(sched)
    [urgent] = make_requests(1, prompt_len=6, priority=1)
    sched.add(urgent)
    out, _ = step(sched)
    assert {c.request_id for c in out.chunks} == {background.request_id, urgent.request_id}


def test_an_urgent_request_that_does_not_fit_yet_leaves_the_others_running() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4)
    [background] = make_requests(1, prompt_len=8, max_new_tokens=4, priority=3)
    sched.add(background)
    step(sched)
    [urgent] = make_requests(1, prompt_len=16, max_new_tokens=2, priority=2)  # 4 blocks; 3 are free
    sched.add(urgent)
    out, _ = step(sched)
    assert [c.request_id for c in out.chunks] == [background.request_id]


def test_an_interrupted_step_hands_the_same_work_out_again() -> None:
    sched = make_scheduler()
    seqs = make_requests(2, prompt_len=9, max_new_tokens=3)
    for seq in seqs:
        sched.add(seq)
    given_up = sched.schedule()  # the model never finished it: no update
    again = sched.schedule()
    assert [(c.request_id, c.start, c.token_ids) for c in again.chunks] == [
        (c.request_id, c.start, c.token_ids) for c in given_up.chunks
    ]
    sched.update_from_output(again, fake_sampled(again))
    check_invariants(sched)
    assert all(s.num_output_tokens == 1 for s in seqs)


def test_a_first_token_step_leaves_out_urgent_decodes_too() -> None:
    sched = make_scheduler()
    [streaming] = make_requests(1, prompt_len=6, max_new_tokens=20, priority=1)
    [background] = make_requests(1, prompt_len=6, max_new_tokens=20, priority=4)
    sched.add(streaming)
    sched.add(background)
    step(sched)
    [new] = make_requests(1, prompt_len=6, priority=2)
    sched.add(new)
    out, _ = step(sched)
    assert [c.request_id for c in out.chunks] == [new.request_id]


def test_only_passes_of_lower_priority_work_may_be_interrupted() -> None:
    sched = make_scheduler()
    [urgent] = make_requests(1, prompt_len=6, max_new_tokens=20, priority=2)
    sched.add(urgent)
    first_token = sched.schedule()
    assert not sched.interruptible(first_token)
    sched.update_from_output(first_token, fake_sampled(first_token))
    urgent_decodes = sched.schedule()
    assert not sched.interruptible(urgent_decodes)  # a load of urgent streams keeps its throughput
    sched.update_from_output(urgent_decodes, fake_sampled(urgent_decodes))
    [background] = make_requests(1, prompt_len=6, priority=3)
    sched.add(background)
    assert sched.interruptible(sched.schedule())
