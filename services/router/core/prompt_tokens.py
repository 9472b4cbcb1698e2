"""Prompt token counts for placement and queueing, before any worker has tokenized the prompt.

The router has no tokenizer: it counts about four characters a token, and learns from each
finished request how far that falls short for its model. Above all that is the chat template's
own tokens (a system prompt, role markers), which a short question does not show and which
weigh most where prefill is slow.
"""

from __future__ import annotations


def rough_tokens(chars: int) -> int:
    """About four characters a token in English."""
    return chars // 4 + 1


class PromptTokens:
    """`rough_tokens` plus what the workers' counts have shown it misses, per model."""

    def __init__(self, weight: float = 0.1) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight={weight}: must be in (0, 1]")
        self.weight = weight
        self._offset: dict[str, float] = {}

    def estimate(self, model: str, chars: int) -> int:
        return max(1, rough_tokens(chars) + round(self._offset.get(model, 0.0)))

    def observe(self, model: str, chars: int, actual: int) -> None:
        """A worker counted `actual` prompt tokens for a prompt of `chars` characters."""
        if actual <= 0:
            return
        miss = actual - rough_tokens(chars)
        known = self._offset.get(model)
        self._offset[model] = miss if known is None else known + self.weight * (miss - known)
