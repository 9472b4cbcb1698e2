"""PII and secrets in text: e-mail addresses, phone numbers, IBANs (mod-97 checked), payment
card numbers (Luhn checked) and API-key-like secrets; found as spans and redacted by kind."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

EMAIL = "email"
PHONE = "phone"
IBAN = "iban"
CARD = "card"
SECRET = "secret"
KINDS = (SECRET, EMAIL, IBAN, CARD, PHONE)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


_SECRET_RES = [
    re.compile(r"\b(?:sk|pk|rk)-(?:live-|test-|proj-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    re.compile(r"\bimk_[0-9a-f]{12}_[A-Za-z0-9_-]{32,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWT
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"),
    # key = value where the name says secret and the value looks random enough.
    re.compile(
        r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"
        r"\s*[:=]\s*[\"']?(?=[^\s\"']*\d)[^\s\"']{8,}"
    ),
]
_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE_RE = re.compile(
    r"(?<![\w+#])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,5}(?![\w])"
)
_DATE_RE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _phone_ok(match: str) -> bool:
    digits = _digits(match)
    if not 9 <= len(digits) <= 15 or _DATE_RE.match(match.strip()):
        return False
    # A bare run of digits is an id or an amount more often than a phone number: a phone
    # number is written with a leading + or 0, a parenthesised area code or separators.
    separated = any(c in match for c in " .-()")
    return match.startswith(("+", "0", "(")) or separated


_CHECKS: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    *((SECRET, r, lambda _m: True) for r in _SECRET_RES),
    (EMAIL, _EMAIL_RE, lambda _m: True),
    (IBAN, _IBAN_RE, iban_ok),
    (CARD, _CARD_RE, lambda m: 13 <= len(_digits(m)) <= 19 and luhn_ok(_digits(m))),
    (PHONE, _PHONE_RE, _phone_ok),
]


def find(text: str, kinds: Iterable[str] = KINDS) -> list[Finding]:
    """Non-overlapping findings in text order; where two overlap the earlier kind in KINDS wins."""
    wanted = set(kinds)
    taken: list[Finding] = []
    for kind, pattern, valid in _CHECKS:
        if kind not in wanted:
            continue
        for m in pattern.finditer(text):
            if not valid(m.group()):
                continue
            if any(m.start() < f.end and f.start < m.end() for f in taken):
                continue
            taken.append(Finding(kind, m.start(), m.end()))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, findings: Iterable[Finding]) -> str:
    out = []
    pos = 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[pos : f.start])
        out.append(f"[{f.kind.upper()}]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
