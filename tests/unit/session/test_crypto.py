"""Key ring parsing, AES-GCM sealing bound to its place, and the embedded key file."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from services.session.crypto import (
    NONCE_BYTES,
    DecryptError,
    KeyRing,
    KeyRingError,
    load_key_ring,
    message_aad,
)

KEY = base64.b64encode(bytes(range(32))).decode()


def test_parse_keeps_the_first_key_active():
    ring = KeyRing.parse(f"new:{KEY}, old:{base64.b64encode(bytes(32)).decode()}")
    assert ring.active == "new" and set(ring.keys) == {"new", "old"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no keys"),
        (f"{KEY}", "must be id:base64key"),
        ("k:not base64!", "not valid base64"),
        (f"k:{base64.b64encode(b'short').decode()}", "must be 32 bytes, got 5"),
        (f"k:{KEY},k:{KEY}", "listed twice"),
    ],
)
def test_parse_errors_name_the_problem_without_key_material(text, expected):
    with pytest.raises(KeyRingError, match=expected) as info:
        KeyRing.parse(text)
    assert KEY not in str(info.value)


def test_sealed_content_opens_only_in_its_place():
    ring = KeyRing.parse(f"k1:{KEY}")
    aad = message_aad("acme", "s1", 7)
    key_id, sealed = ring.seal(b"hello there", aad)
    assert key_id == "k1" and b"hello" not in sealed
    assert ring.open(key_id, sealed, aad) == b"hello there"
    # A fresh 96-bit nonce each time: the same text never seals the same way twice.
    assert ring.seal(b"hello there", aad)[1][:NONCE_BYTES] != sealed[:NONCE_BYTES]
    for elsewhere in (
        message_aad("acme", "s1", 8),
        message_aad("acme", "s2", 7),
        message_aad("other", "s1", 7),
    ):
        with pytest.raises(DecryptError):
            ring.open(key_id, sealed, elsewhere)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptError):
        ring.open(key_id, tampered, aad)


def test_old_keys_still_open_after_rotation_and_unknown_keys_are_named():
    old = KeyRing.parse(f"k1:{KEY}")
    blob = old.seal_blob(b"cached", b"key|field")
    rotated = KeyRing.parse(f"{KeyRing.new_entry('k2')},k1:{KEY}")
    assert rotated.active == "k2" and rotated.open_blob(blob, b"key|field") == b"cached"
    with pytest.raises(DecryptError, match="'k1' is not in the key ring"):
        KeyRing.parse(KeyRing.new_entry("k2")).open_blob(blob, b"key|field")


def test_key_file_is_created_private_once_and_reused(tmp_path):
    first = load_key_ring("", tmp_path / "state")
    files = list((tmp_path / "state").iterdir())
    assert len(files) == 1 and stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
    assert load_key_ring("", tmp_path / "state") == first
    assert load_key_ring(f"cfg:{KEY}", tmp_path / "state").active == "cfg"
