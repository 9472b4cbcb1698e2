"""Dynamic batching state: which queued inputs go into the next encode call.

Plain Python, no asyncio or torch. The `Batcher` actor owns one `BatchQueue`
and drives it: `add` a job, take `next_batch`, then `complete` (or `fail`) it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(eq=False)
class Job(Generic[V]):
    """One caller's inputs; answered once every one of them is encoded."""

    texts: Sequence[str]
    # Tokens each input costs the encoder (after truncation); sizes batches.
    tokens: Sequence[int]
    arrived: float
    results: list[V | None] = field(init=False)
    remaining: int = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.tokens):
            raise ValueError(f"{len(self.texts)} texts but {len(self.tokens)} token counts")
        if not self.texts:
            raise ValueError("a job needs at least one input")
        self.results = [None] * len(self.texts)
        self.remaining = len(self.texts)


@dataclass(frozen=True)
class Slot(Generic[V]):
    """Input `index` of `job`."""

    job: Job[V]
    index: int

    @property
    def text(self) -> str:
        return self.job.texts[self.index]

    @property
    def tokens(self) -> int:
        # An empty input still occupies a row of the padded batch.
        return max(1, self.job.tokens[self.index])


def batch_cost(items: int, longest: int) -> int:
    """Tokens one encode call computes: every row is padded to the longest."""
    return items * longest


@dataclass(frozen=True)
class Batch(Generic[V]):
    slots: tuple[Slot[V], ...]

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.slots]

    @property
    def cost(self) -> int:
        return batch_cost(len(self.slots), max(s.tokens for s in self.slots))


class BatchQueue(Generic[V]):
    """FIFO of inputs from many jobs, cut into batches by a token budget and a max wait.

    A batch is ready when the queued inputs fill the budget, or when the oldest has
    waited `max_wait_s`. Batches take inputs in arrival order, so a job larger than
    the budget is spread over consecutive batches; an input alone over the budget
    runs alone. Inside a batch the inputs are sorted by length, shortest first.
    """

    def __init__(self, max_batch_tokens: int, max_wait_s: float) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens}: must be >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s}: must be >= 0")
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self._slots: collections.deque[Slot[V]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Inputs queued, not yet in a batch."""
        return len(self._slots)

    @property
    def waiting_tokens(self) -> int:
        return sum(s.tokens for s in self._slots)

    def add(self, job: Job[V]) -> None:
        self._slots.extend(Slot(job, i) for i in range(len(job.texts)))

    def cancel(self, job: Job[V]) -> None:
        """Forget a job whose caller went away; inputs already running are ignored on completion."""
        job.cancelled = True
        self._slots = collections.deque(s for s in self._slots if s.job is not job)

    def wake_at(self) -> float | None:
        """When the oldest input's wait runs out; None when nothing is queued."""
        if not self._slots:
            return None
        return self._slots[0].job.arrived + self.max_wait_s

    def next_batch(self, now: float) -> Batch[V] | None:
        """The next batch if one is ready at `now` (budget full or wait over), else None."""
        if not self._slots:
            return None
        take, full = self._fit()
        wake_at = self.wake_at()
        if not full and wake_at is not None and now < wake_at:
            return None
        taken = [self._slots.popleft() for _ in range(take)]
        # Shortest first: the encoder cuts a batch into chunks, and a chunk of similar lengths
        # pads little. Who is in the batch stays decided by arrival order.
        return Batch(tuple(sorted(taken, key=lambda s: s.tokens)))

    def _fit(self) -> tuple[int, bool]:
        """How many leading inputs fit the budget, and whether the budget is full."""
        longest = 0
        for count, slot in enumerate(self._slots):
            longest_with = max(longest, slot.tokens)
            if count > 0 and batch_cost(count + 1, longest_with) > self.max_batch_tokens:
                return count, True
            longest = longest_with
        count = len(self._slots)
        return count, batch_cost(count, longest) >= self.max_batch_tokens

    def complete(self, batch: Batch[V], vectors: Sequence[V]) -> list[Job[V]]:
        """Hand each vector to its job; return the jobs now fully answered."""
        if len(vectors) != len(batch):
            raise ValueError(f"encoder returned {len(vectors)} vectors for {len(batch)} inputs")
        finished: list[Job[V]] = []
        for slot, vector in zip(batch.slots, vectors, strict=True):
            job = slot.job
            if job.cancelled:
                continue
            job.results[slot.index] = vector
            job.remaining -= 1
            if job.remaining == 0:
                finished.append(job)
        return finished

    def fail(self, batch: Batch[V]) -> list[Job[V]]:
        """The encode call for `batch` failed: drop its jobs (queued rest included) and return them."""
        failed: list[Job[V]] = []
        for slot in batch.slots:
            if not slot.job.cancelled and slot.job not in failed:
                failed.append(slot.job)
        for job in failed:
            self.cancel(job)
        return failed
