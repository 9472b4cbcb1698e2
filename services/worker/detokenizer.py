"""Incremental detokenisation that never splits a character.

Byte-level vocabularies put one UTF-8 character across several tokens; decoding
a partial character yields U+FFFD. We decode a small window of recent tokens and
release new text only once it no longer ends in a partial character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`decode` turns token ids into text (special tokens skipped).

    `context_ids` are tokens already shown (the end of the prompt, resumed tokens):
    they give the first new token its left context (leading spaces) and are never
    released themselves.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context_ids)
        # Text of ids[prefix:read] has been released; ids[read:] are waiting for a whole character.
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end: release what is left, minus a character the model never finished."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT)
