"""History windows by token budget: the newest messages that fit, the system prompt kept."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

from services.session.model import Role

# Rough characters per token for English text with BPE tokenizers; only used
# when the caller did not count tokens itself.
CHARS_PER_TOKEN = 4


class Countable(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def role(self) -> Role: ...
    @property
    def token_count(self) -> int: ...


M = TypeVar("M", bound=Countable)


def estimate_tokens(content: str) -> int:
    return math.ceil(len(content) / CHARS_PER_TOKEN)


def first_system(messages: Sequence[M]) -> M | None:
    return next((m for m in messages if m.role == Role.SYSTEM), None)


def select_window(messages: Sequence[M], token_budget: int) -> tuple[list[M], bool]:
    """Pick the window from `messages` (in seq order); returns (window, truncated).

    The first system message is always kept, even alone over budget, because a
    prompt without its instructions changes the model's behaviour. The rest is
    the longest run of newest messages whose token counts fit what is left: a
    message that does not fit ends the run, so the window never has holes.
    A budget of 0 means no limit.
    """
    if token_budget <= 0:
        return list(messages), False
    system = first_system(messages)
    remaining = token_budget - (system.token_count if system is not None else 0)
    kept: list[M] = []
    for message in reversed(messages):
        if system is not None and message.seq == system.seq:
            continue
        if message.token_count > remaining:
            break
        remaining -= message.token_count
        kept.append(message)
    if system is not None:
        kept.append(system)
    kept.sort(key=lambda m: m.seq)
    return kept, len(kept) < len(messages)
