"""One engine step, device-free: schedule, hand the chunks to an executor, feed the samples back.

The executor (`BatchRunner` on a real model, a scripted one in tests) runs the
forward pass; this module keeps the scheduler and the sequences' streams in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

from services.worker.core.scheduler import Scheduler, SchedulerOutput
from services.worker.core.seq_state import FinishReason, SeqState
from services.worker.sequence import Delta, Finish, GenSequence


class StepInterrupted(Exception):
    """The executor gave a forward pass up part-way because `interrupt` said so. Nothing of
    it counts: the scheduler was not updated, so its next `schedule()` hands the work out again
    (the cache slots the pass wrote are written again, with the same values)."""


class StepExecutor(Protocol):
    """Runs one scheduled step on the device: (token, logprob) of every chunk that samples.

    With `interrupt`, the executor may call it while it works and raise `StepInterrupted`
    when it returns True.
    """

    def execute(
        self,
        out: SchedulerOutput,
        seqs: Mapping[str, GenSequence],
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[str, tuple[int, float | None]]: ...


@dataclasses.dataclass
class StepResult:
    # What to stream, by engine key; a delta with `finish` set ends its request.
    deltas: dict[str, Delta] = dataclasses.field(default_factory=dict)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preempted: int = 0
    # The pass was given up for an urgent arrival: no tokens, nothing recorded.
    interrupted: bool = False
    # Set when the forward pass raised: every sequence of the step failed with it (keys in `failed`).
    error: BaseException | None = None
    failed: tuple[str, ...] = ()


def run_step(
    scheduler: Scheduler,
    runner: StepExecutor,
    seqs: Mapping[str, GenSequence],
    urgent_arrived: Callable[[], bool] | None = None,
) -> StepResult:
    """schedule -> execute -> update.

    `urgent_arrived` says whether an urgent request came in since the step began: a step of
    lower-priority work gives its pass up for it, so that the urgent request's first token does
    not wait for the whole pass (the next step runs it first).

    A sequence that ends on a stop string (which only its detokeniser can see) is
    finished in the scheduler here too, so its blocks are free when this returns.
    A forward pass that raises fails the sequences it carried and frees their blocks;
    the engine goes on with the others.
    """
    out = scheduler.schedule()
    decode = sum(1 for c in out.chunks if len(c.token_ids) == 1 and c.sample)
    result = StepResult(
        prefill_tokens=out.num_tokens - decode, decode_tokens=decode, preempted=len(out.preempted)
    )
    interrupt = urgent_arrived if urgent_arrived is not None and scheduler.interruptible(out) else None
    try:
        sampled = runner.execute(out, seqs, interrupt)
    except StepInterrupted:
        return StepResult(preempted=len(out.preempted), interrupted=True)
    except Exception as exc:  # the batch fails, the engine goes on
        result.error = exc
        result.failed = tuple(c.request_id for c in out.chunks)
        for key in result.failed:
            scheduler.finish(key)
        return result
    scheduler.update_from_output(out, {key: token for key, (token, _) in sampled.items()})
    for key, (token, logprob) in sampled.items():
        seq = seqs[key]
        delta = seq.append(token, logprob)
        state = scheduler.get(key)
        if seq.finish is not None and state is not None:
            scheduler.finish(key, FinishReason.STOP)
        elif seq.finish is None and state is None:
            # Only when the scheduler was given other limits than the sequence (see `state_for`).
            delta = _merge(delta, seq.end(Finish.LENGTH))
        if delta is not None:
            result.deltas[key] = delta
    return result


def state_for(key: str, seq: GenSequence) -> SeqState:
    """The scheduler's view of a sequence, with the same token limits so both finish together."""
    return SeqState.new(key, seq.prefix_ids, seq.remaining, sorted(seq.stop_ids), seq.priority)


def _merge(first: Delta | None, last: Delta) -> Delta:
    if first is None:
        return last
    first.text += last.text
    first.token_ids += last.token_ids
    first.logprobs += last.logprobs
    first.finish, first.usage = last.finish, last.usage
    return first
