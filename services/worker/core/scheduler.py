"""Iteration-level scheduler: which sequences run in the next forward pass, and how many tokens each.

The engine step is `schedule()` -> run the model on the chunks -> `update_from_output()`.
Every step fits a token budget: running sequences go first (a decode costs one
token, an unfinished prompt a chunk of it), then waiting ones are admitted while
blocks and seats last. When a running sequence needs a block and none is free,
the most recently admitted sequence gives its blocks back and is recomputed later.

Priorities: the waiting queue is ordered by priority (first come first within one).
While an urgent sequence (priority <= `urgent_priority`) waits for its first token,
steps run only such sequences: its prefill is a short step of its own, as on an idle
worker, whatever else is running (the engine also gives up a pass in progress for it).
At most `max_urgent_steps` such steps run in a row, so the others never starve.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Mapping

from services.worker.core.block_manager import BlockManager
from services.worker.core.seq_state import FinishReason, SeqState, SeqStatus


class AdmissionError(Exception):
    """A sequence the scheduler will not take."""


class QueueFull(AdmissionError):
    pass


class SequenceTooLong(AdmissionError):
    pass


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    # Position of the first token of the chunk.
    start: int
    token_ids: tuple[int, ...]
    # Blocks covering positions 0 .. start + len(token_ids) - 1.
    block_table: tuple[int, ...]
    # The chunk ends the sequence's known tokens: the model samples the next one.
    sample: bool
    serial: int = 0


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...] = ()
    # Sequences that lost their blocks this step; they start over from position 0.
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    # Most prompt tokens of one sequence per step, so a long prompt leaves room for others; 0: the budget.
    max_prefill_chunk: int = 0
    # Sequences at this priority or more urgent (lower) get steps of their own for their
    # first token; 0 turns that off.
    urgent_priority: int = 2
    # Most such steps in a row before one that runs everybody.
    max_urgent_steps: int = 2

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_urgent_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_prefill_chunk", "urgent_priority"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


class Scheduler:
    def __init__(self, blocks: BlockManager, limits: SchedulerLimits | None = None) -> None:
        self.blocks = blocks
        self.limits = limits or SchedulerLimits()
        self.waiting: collections.deque[SeqState] = collections.deque()
        self.running: list[SeqState] = []
        self._seqs: dict[str, SeqState] = {}
        self._serials = itertools.count(1)
        self._urgent_streak = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> SeqState | None:
        return self._seqs.get(request_id)

    def add(self, seq: SeqState) -> None:
        """Queue a sequence, or refuse it while the queue is full or if it could never fit."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(
                f"{len(self.waiting)} sequences already waiting (limit {self.limits.max_waiting})"
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if seq.max_positions > capacity:
            raise SequenceTooLong(
                f"{seq.num_prompt_tokens} prompt tokens + {seq.max_new_tokens} new tokens "
                f"need {seq.max_positions} cache positions; the KV cache holds {capacity}"
            )
        seq.serial = next(self._serials)
        seq.status = SeqStatus.WAITING
        seq.extend_hashes(self.blocks.block_size)
        # Behind every waiting sequence of its priority or a more urgent one.
        at = len(self.waiting)
        while at > 0 and self.waiting[at - 1].priority > seq.priority:
            at -= 1
        self.waiting.insert(at, seq)
        self._seqs[seq.request_id] = seq

    def finish(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> SeqState | None:
        """End a sequence now, wherever it is; its blocks are free when this returns."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def schedule(self) -> SchedulerOutput:
        if self._first_token_step():
            out = self._schedule(only_first_tokens=True)
            # An urgent sequence that does not fit yet leaves nothing to run: run the others.
            if out.chunks or out.preempted:
                return out
        return self._schedule(only_first_tokens=False)

    def _schedule(self, *, only_first_tokens: bool) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if only_first_tokens and not self._awaits_first_token(seq):
                i += 1
                continue
            num_new = self._chunk_len(seq, seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow_or_preempt(seq, num_new, preempted):
                break
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new
            i += 1
        # After a preemption memory is short: admitting more would only preempt again.
        for seq in list(self.waiting):
            if budget <= 0 or preempted or len(self.running) >= self.limits.max_num_seqs:
                break
            if only_first_tokens and not self._awaits_first_token(seq):
                continue
            num_new = self._admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def update_from_output(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[SeqState]:
        """Record what the model computed and sampled; returns the sequences that finished."""
        finished: list[SeqState] = []
        for chunk in output.chunks:
            seq = self._seqs.get(chunk.request_id)
            # Finished (cancelled) while the model ran: its blocks are already back.
            if seq is None or seq.serial != chunk.serial or seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens = chunk.start + len(chunk.token_ids)
            if chunk.sample:
                token = sampled[chunk.request_id]
                seq.token_ids.append(token)
                seq.extend_hashes(self.blocks.block_size)
            self._register_full_blocks(seq)
            if chunk.sample:
                reason = self._finish_reason(seq, seq.token_ids[-1])
                if reason is not None:
                    finished.append(seq)
                    self.finish(seq.request_id, reason)
        return finished

    def interruptible(self, out: SchedulerOutput) -> bool:
        """Whether the engine may give this step's pass up for an urgent arrival: it runs some
        lower-priority work and carries no urgent sequence towards its first token. (Urgent
        streams alone are never interrupted: a load of nothing but urgent requests keeps its
        throughput.)"""
        seqs = [seq for c in out.chunks if (seq := self._seqs.get(c.request_id)) is not None]
        return any(s.priority > self.limits.urgent_priority for s in seqs) and not any(
            self._awaits_first_token(s) for s in seqs
        )

    def _awaits_first_token(self, seq: SeqState) -> bool:
        return seq.priority <= self.limits.urgent_priority and seq.num_output_tokens == 0

    def _first_token_step(self) -> bool:
        """Whether this step runs only the urgent sequences that await their first token: there
        are some, others would share (and slow) the step, and the streak is not at its limit."""
        seqs = list(itertools.chain(self.waiting, self.running))
        first = sum(self._awaits_first_token(s) for s in seqs)
        if not first or first == len(seqs) or self._urgent_streak >= self.limits.max_urgent_steps:
            self._urgent_streak = 0
            return False
        self._urgent_streak += 1
        return True

    def _chunk_len(self, seq: SeqState, remaining: int, budget: int) -> int:
        return min(remaining, budget, self.limits.max_prefill_chunk or budget)

    def _grow_or_preempt(self, seq: SeqState, num_new: int, preempted: list[str]) -> bool:
        """Give `seq` the blocks for `num_new` more tokens, preempting from the back as needed.

        False when `seq` itself had to go (it was the last one running).
        """
        need = self.blocks.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_table)
        while need > self.blocks.num_free_blocks:
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        seq.block_table += self.blocks.allocate(need)
        return True

    def _admit(self, seq: SeqState, budget: int) -> int:
        """Take cached prefix blocks and fresh ones for the first chunk; 0 when they do not fit."""
        size = self.blocks.block_size
        # The last token is always computed: its logits pick the next token.
        cached = self.blocks.find_cached(seq.block_hashes[: (seq.num_tokens - 1) // size])
        num_cached = len(cached) * size
        num_new = self._chunk_len(seq, seq.num_tokens - num_cached, budget)
        need = self.blocks.blocks_needed(num_cached + num_new) - len(cached)
        if not self.blocks.can_allocate(cached, need):
            return 0
        self.blocks.take_cached(cached)
        seq.block_table = cached + self.blocks.allocate(need)
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        seq.num_registered_blocks = len(cached)
        self.blocks.record_lookup(seq.num_tokens, num_cached)
        return num_new

    def _chunk(self, seq: SeqState, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            request_id=seq.request_id,
            start=start,
            token_ids=tuple(seq.token_ids[start:end]),
            block_table=tuple(seq.block_table),
            sample=end == seq.num_tokens,
            serial=seq.serial,
        )

    def _register_full_blocks(self, seq: SeqState) -> None:
        full = min(seq.num_computed_tokens // self.blocks.block_size, len(seq.block_hashes))
        for i in range(seq.num_registered_blocks, full):
            self.blocks.cache_block(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _finish_reason(self, seq: SeqState, token: int) -> FinishReason | None:
        if token in seq.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _preempt(self, seq: SeqState) -> None:
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        # First of its priority: it held a seat before those admitted after it.
        at = 0
        while at < len(self.waiting) and self.waiting[at].priority < seq.priority:
            at += 1
        self.waiting.insert(at, seq)

    def _release(self, seq: SeqState) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
