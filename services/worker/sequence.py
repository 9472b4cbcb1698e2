"""One request's generation state: tokens so far, what to stream next, when to finish.

Pure Python: the engine feeds it sampled tokens, it answers with the deltas to
send. Token ids travel together with the text they produced, so a client that
resumes elsewhere from the ids it received has seen exactly their text.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

from services.worker.core.seq_state import STANDARD_PRIORITY
from services.worker.detokenizer import IncrementalDetokenizer
from services.worker.request import SamplingParams
from services.worker.stop import StopMatcher

# Tokens of left context for the detokeniser; enough for any leading-space rule.
_DETOKENIZER_CONTEXT = 6


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    # Resumed tokens included: they count toward max_tokens and are part of the answer.
    completion_tokens: int


@dataclasses.dataclass
class Delta:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # Set on the last delta only.
    finish: Finish | None = None
    usage: Usage | None = None


class GenSequence:
    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: Sequence[int],
        resume_ids: Sequence[int],
        sampling: SamplingParams,
        seed: int,
        max_new_tokens: int,
        decode: Callable[[Sequence[int]], str],
        eos_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        priority: int = STANDARD_PRIORITY,
    ) -> None:
        self.request_id = request_id
        self.priority = priority
        self.prompt_ids = list(prompt_ids)
        self.resume_ids = list(resume_ids)
        self.sampling = sampling
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.output_ids: list[int] = []
        self.finish: Finish | None = None
        stop_ids = set(stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(eos_ids)
        self._stop_ids = frozenset(stop_ids)
        context = (self.prompt_ids + self.resume_ids)[-_DETOKENIZER_CONTEXT:]
        self._detok = IncrementalDetokenizer(decode, context)
        self._matcher = StopMatcher(stop)
        self._pending = Delta()

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end the sequence (eos included unless ignore_eos)."""
        return self._stop_ids

    @property
    def prefix_ids(self) -> list[int]:
        """What the model must see before it samples the first new token."""
        return self.prompt_ids + self.resume_ids

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.resume_ids + self.output_ids

    @property
    def step_index(self) -> int:
        """Index of the next token among all completion tokens, resumed ones included.

        Seeded sampling draws from (seed, step_index), so a resumed stream samples
        exactly what the original one would have.
        """
        return len(self.resume_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.resume_ids) + len(self.output_ids)

    def append(self, token_id: int, logprob: float | None) -> Delta | None:
        """Take a sampled token; returns what to send now (None while text is held back)."""
        if self.finish is not None:
            raise RuntimeError(f"request {self.request_id!r} already finished")
        self.output_ids.append(token_id)
        self._pending.token_ids.append(token_id)
        if logprob is not None and self.sampling.logprobs:
            self._pending.logprobs.append(logprob)
        if token_id in self._stop_ids:
            return self.end(Finish.STOP)
        self._pending.text += self._matcher.feed(self._detok.add(token_id))
        if self._matcher.stopped:
            return self.end(Finish.STOP)
        if self.remaining <= 0:
            return self.end(Finish.LENGTH)
        # The first token goes out at once, text or not (a special token, half a character, the
        # start of a stop string): the caller's time to first token is this step, not the next.
        if not self._pending.text and len(self.output_ids) > 1:
            return None
        return self._take()

    def end(self, reason: Finish) -> Delta:
        """Finish now; the last delta carries whatever was held back (unless it belongs to a stop)."""
        self.finish = reason
        if not self._matcher.stopped:
            self._pending.text += self._matcher.feed(self._detok.flush())
            self._pending.text += self._matcher.flush()
        delta = self._take()
        delta.finish = reason
        delta.usage = Usage(len(self.prompt_ids), self.completion_tokens)
        return delta

    def _take(self) -> Delta:
        delta, self._pending = self._pending, Delta()
        return delta
