"""API key format and hashing, shared by the router (verifies) and the session service (bootstrap).

A key reads `imk_<prefix>_<secret>`: the prefix (12 hex characters) is public and names the
key in lists, audit events and revocation; the secret (43 URL-safe characters, 256 bits) is
only ever shown once. Stored is HMAC-SHA256(salt, secret) with a random per-key salt. A slow
KDF would add nothing: the secret is random with 256 bits of entropy, so nothing can be
guessed from the hash, and the salt makes rows incomparable. Compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCHEME = "imk"
PREFIX_CHARS = 12
SALT_BYTES = 16
_KEY_RE = re.compile(rf"^{SCHEME}_([0-9a-f]{{{PREFIX_CHARS}}})_([A-Za-z0-9_-]{{32,128}})$")


@dataclass(frozen=True)
class NewKey:
    key: str  # the whole key: shown once, never stored
    prefix: str
    salt: bytes
    key_hash: bytes


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def generate() -> NewKey:
    prefix = secrets.token_hex(PREFIX_CHARS // 2)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(SALT_BYTES)
    return NewKey(f"{SCHEME}_{prefix}_{secret}", prefix, salt, hash_secret(salt, secret))


def split(key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    match = _KEY_RE.match(key)
    if match is None:
        return None
    return match.group(1), match.group(2)


def verify(secret: str, salt: bytes, key_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(salt, secret), key_hash)


def valid_prefix(prefix: str) -> bool:
    return len(prefix) == PREFIX_CHARS and all(c in "0123456789abcdef" for c in prefix)
