"""Prompt-injection detection by weighted phrase patterns: instructions to drop earlier
instructions, to reveal the system prompt, to take on an unrestricted persona, and chat
template tokens smuggled into user text. A score of 1.0 or more flags the text."""

from __future__ import annotations

import re
from dataclasses import dataclass

THRESHOLD = 1.0

_PREVIOUS = (
    r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|these\s+|those\s+)*"
    r"(?:previous|prior|above|earlier|preceding|original|initial|system|existing)"
)
_RULES = r"(?:instructions?|prompts?|rules|directions|guidelines|context|messages?|constraints|programming)"
_SECRET_PROMPT = r"(?:system|hidden|secret|initial|original)\s+(?:prompt|instructions?|message)"
_UNRESTRICTED = r"(?:DAN|unrestricted|unfiltered|uncensored|evil|jailbroken|developer\s+mode)"

# (name, weight, pattern): a text is flagged when the weights of the patterns it matches
# add up to THRESHOLD; weaker signals need a second one.
_RAW: list[tuple[str, float, str]] = [
    (
        "ignore_previous",
        1.0,
        rf"\b(?:ignore|disregard|forget|skip|drop|override|bypass)\b[\w\s,']{{0,20}}?"
        rf"{_PREVIOUS}\s+{_RULES}",
    ),
    ("forget_everything", 1.0, r"\bforget\s+(?:everything|all)\s+(?:you|that|above|before)"),
    ("new_instructions", 0.6, r"\b(?:new|updated|real|actual)\s+instructions?\s*[:\-]"),
    (
        "reveal_prompt",
        1.0,
        r"\b(?:reveal|print|show|repeat|output|display|tell\s+me|give\s+me|leak|dump)\b"
        rf"[\w\s]{{0,20}}?\b{_SECRET_PROMPT}",
    ),
    (
        "your_instructions",
        0.5,
        r"\byour\s+(?:original|initial|system|hidden|secret)\s+(?:instructions|prompt)",
    ),
    ("prompt_verbatim", 0.6, r"\b(?:verbatim|word\s+for\s+word)\b"),
    (
        "repeat_above",
        0.6,
        r"\brepeat\s+(?:the\s+|all\s+|everything\s+)?(?:text|words|everything|lines)\s+above",
    ),
    (
        "persona",
        1.0,
        r"\b(?:you\s+are\s+now|from\s+now\s+on\s+you\s+are|act\s+as|pretend\s+to\s+be|roleplay\s+as)"
        rf"\s+(?:an?\s+)?{_UNRESTRICTED}",
    ),
    ("persona_generic", 0.5, r"\byou\s+are\s+now\s+(?:a|an|my)\b"),
    ("dan", 1.0, r"\bDAN\b|\bdo\s+anything\s+now\b"),
    ("jailbreak", 0.8, r"\bjail\s?break"),
    (
        "developer_mode",
        1.0,
        r"\b(?:developer|god|admin|debug)\s+mode\s+(?:enabled|on|activated)"
        r"|\benable\s+(?:developer|god|debug)\s+mode",
    ),
    (
        "no_rules",
        1.0,
        r"\b(?:no|without|free\s+(?:of|from))\s+(?:any\s+)?(?:rules|restrictions|filters|limitations"
        r"|guidelines|censorship)\b.{0,40}\b(?:now|anymore|respond|answer|you)",
    ),
    (
        "pretend_no_rules",
        1.0,
        r"\bpretend\b.{0,40}\b(?:no|don't\s+have\s+any)\s+(?:rules|restrictions|filters|guidelines)",
    ),
    (
        "override_safety",
        1.0,
        r"\b(?:override|bypass|disable|turn\s+off|ignore)\s+(?:your\s+|the\s+|all\s+)?"
        r"(?:safety|content|security)\s+(?:filters?|guidelines|rules|policies|policy|measures)",
    ),
    ("override_programming", 1.0, r"\boverride\s+your\s+(?:programming|instructions|rules|training)"),
    ("no_longer_bound", 0.6, r"\bno\s+longer\s+(?:bound|restricted|limited|constrained)\s+by"),
    (
        "template_tokens",
        1.0,
        r"<\|im_start\|>|<\|im_end\|>|<\|system\|>|\[/?INST\]|<<SYS>>|<\|start_header_id\|>"
        r"|<\|eot_id\|>",
    ),
    ("fake_system", 0.8, r"(?:^|\n)\s*(?:#{2,}\s*)?(?:system|assistant)\s*(?:message|prompt)?\s*:\s"),
    ("stop_being", 0.6, r"\bstop\s+being\s+(?:an?\s+)?(?:AI|assistant|helpful)"),
    (
        "exfiltrate",
        0.6,
        r"\b(?:send|post|forward|upload)\b.{0,40}\b(?:conversation|chat\s+history|credentials"
        r"|api\s+keys?)\b.{0,30}\b(?:to|at)\s+(?:https?://|\S+@)",
    ),
]
_PATTERNS = [(name, weight, re.compile(pattern, re.IGNORECASE)) for name, weight, pattern in _RAW]


@dataclass(frozen=True)
class Verdict:
    score: float
    matched: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return self.score >= THRESHOLD


def score(text: str) -> Verdict:
    matched = tuple(name for name, _w, pattern in _PATTERNS if pattern.search(text))
    total = sum(w for name, w, _p in _PATTERNS if name in matched)
    return Verdict(total, matched)
