"""Message content encrypted at rest: AES-256-GCM, a random 96-bit nonce per message, a key ring.

A sealed value is nonce || ciphertext+tag; the key id travels beside it (a column,
or the cache payload's header). The associated data binds a message to its place
(tenant, session id, seq), so a ciphertext copied to another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
KEY_BYTES = 32
KEY_FILE = "session-keys"
MAX_KEY_ID_CHARS = 64


class KeyRingError(ValueError):
    """The key ring text is malformed (the message never holds key material)."""


class DecryptError(Exception):
    """A value did not open: wrong key, tampered data or the wrong place."""


def message_aad(tenant: str, session_id: str, seq: int) -> bytes:
    # Lengths first: no two (tenant, session id) pairs give the same bytes.
    return f"msg:{len(tenant)}:{tenant}:{len(session_id)}:{session_id}:{seq}".encode()


@dataclass(frozen=True)
class KeyRing:
    """Keys by id; new data is sealed with `active`, old data opens with any key still listed."""

    keys: dict[str, bytes]
    active: str

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """`id:base64key` entries separated by commas or lines; the first is the active key."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for n, entry in enumerate(e.strip() for e in text.replace("\n", ",").split(",")):
            if not entry or entry.startswith("#"):
                continue
            key_id, sep, encoded = entry.partition(":")
            key_id = key_id.strip()
            if not sep or not key_id or len(key_id) > MAX_KEY_ID_CHARS:
                raise KeyRingError(f"key entry {n + 1}: must be id:base64key with an id of 1-64 chars")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                raise KeyRingError(f"key {key_id!r}: not valid base64") from None
            if len(key) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r}: must be {KEY_BYTES} bytes, got {len(key)}")
            if key_id in keys:
                raise KeyRingError(f"key {key_id!r}: listed twice")
            keys[key_id] = key
            order.append(key_id)
        if not keys:
            raise KeyRingError("no keys")
        return cls(keys, order[0])

    @staticmethod
    def new_entry(key_id: str) -> str:
        return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return self.active, nonce + AESGCM(self.keys[self.active]).encrypt(nonce, plaintext, aad)

    def open(self, key_id: str, sealed: bytes, aad: bytes) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            raise DecryptError(f"key {key_id!r} is not in the key ring")
        try:
            return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptError(f"a value sealed with key {key_id!r} did not open") from None

    def seal_blob(self, plaintext: bytes, aad: bytes) -> bytes:
        """Key id and sealed value in one blob (for caches, which have no key id column)."""
        key_id, sealed = self.seal(plaintext, aad)
        return bytes([len(key_id)]) + key_id.encode() + sealed

    def open_blob(self, blob: bytes, aad: bytes) -> bytes:
        size = blob[0]
        return self.open(blob[1 : 1 + size].decode(), blob[1 + size :], aad)


def load_key_ring(keys: str, state_dir: str | Path) -> KeyRing:
    """The configured keys, else the key file under state_dir (created with a new key if missing)."""
    if keys:
        return KeyRing.parse(keys)
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting together do not each write a different key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(KeyRing.new_entry("k1") + "\n")
            logger.warning(
                "no encryption_keys configured: created a key file; replicas must share it, keep it safe"
            )
    return KeyRing.parse(path.read_text())
