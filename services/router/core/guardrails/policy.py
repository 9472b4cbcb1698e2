"""The guardrails as one policy: which detectors run (each on its own switch), what they do to
a request's texts, and a redactor for streamed output. Pure: no grpc, no metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.router.core.guardrails import injection, pii

INPUT_SIZE = "max_input_size"
INJECTION = "prompt_injection"
PII_INPUT = "pii_input"
PII_OUTPUT = "pii_output"

# Output is held back this many characters so a PII item split across streamed chunks is
# still seen whole before any of it leaves.
HOLDBACK_CHARS = 96


@dataclass(frozen=True)
class GuardrailConfig:
    max_input_chars: int = 0  # 0: off
    injection: bool = False
    pii_input: bool = False
    pii_output: bool = False
    pii_kinds: tuple[str, ...] = pii.KINDS

    @property
    def enabled(self) -> bool:
        return bool(self.max_input_chars or self.injection or self.pii_input or self.pii_output)


@dataclass(frozen=True)
class Blocked:
    guardrail: str
    field: str
    reason: str


@dataclass
class InputResult:
    texts: list[str]
    blocked: Blocked | None = None
    redacted: dict[str, int] = field(default_factory=dict)  # PII kind → count


def check_input(
    config: GuardrailConfig, texts: Sequence[str], fields: Sequence[str], checked: Sequence[bool]
) -> InputResult:
    """Size, injection (on the texts marked `checked`, i.e. user and tool turns) and PII redaction."""
    result = InputResult(list(texts))
    total = sum(len(t) for t in texts)
    if config.max_input_chars and total > config.max_input_chars:
        reason = f"input of {total} characters is over max_input_chars={config.max_input_chars}"
        result.blocked = Blocked(INPUT_SIZE, fields[0] if fields else "input", reason)
        return result
    if config.injection:
        for text, name, check in zip(texts, fields, checked, strict=True):
            verdict = injection.score(text) if check else None
            if verdict is not None and verdict.flagged:
                reason = f"refused by the prompt-injection guardrail (matched: {', '.join(verdict.matched)})"
                result.blocked = Blocked(INJECTION, name, reason)
                return result
    if config.pii_input:
        for i, text in enumerate(texts):
            findings = pii.find(text, config.pii_kinds)
            if findings:
                result.texts[i] = pii.redact(text, findings)
                for f in findings:
                    result.redacted[f.kind] = result.redacted.get(f.kind, 0) + 1
    return result


class OutputRedactor:
    """Redacts PII in a stream of text chunks: `feed` returns what may be sent now, `finish` the rest."""

    def __init__(self, kinds: Sequence[str] = pii.KINDS, holdback: int = HOLDBACK_CHARS) -> None:
        self.kinds = tuple(kinds)
        self.holdback = holdback
        self.pending = ""
        self.redacted: dict[str, int] = {}

    def _count(self, findings: Sequence[pii.Finding]) -> None:
        for f in findings:
            self.redacted[f.kind] = self.redacted.get(f.kind, 0) + 1

    def feed(self, chunk: str) -> str:
        self.pending += chunk
        if len(self.pending) <= self.holdback:
            return ""
        findings = pii.find(self.pending, self.kinds)
        cut = len(self.pending) - self.holdback
        # Never cut inside a finding: send up to its start and keep it for the next round.
        for f in findings:
            if f.start < cut < f.end:
                cut = f.start
        ready = [f for f in findings if f.end <= cut]
        self._count(ready)
        out = pii.redact(self.pending[:cut], ready)
        self.pending = self.pending[cut:]
        return out

    def finish(self) -> str:
        findings = pii.find(self.pending, self.kinds)
        self._count(findings)
        out = pii.redact(self.pending, findings)
        self.pending = ""
        return out
