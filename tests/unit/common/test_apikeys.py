"""API key format and salted hashes."""

from __future__ import annotations

from services.common import apikeys


def test_generated_keys_split_and_verify():
    new = apikeys.generate()
    parts = apikeys.split(new.key)
    assert parts is not None
    prefix, secret = parts
    assert prefix == new.prefix and apikeys.valid_prefix(prefix)
    assert apikeys.verify(secret, new.salt, new.key_hash)
    assert not apikeys.verify(secret[:-1] + ("a" if secret[-1] != "a" else "b"), new.salt, new.key_hash)


def test_the_hash_is_salted_and_never_the_key():
    a, b = apikeys.generate(), apikeys.generate()
    assert a.salt != b.salt and a.prefix != b.prefix
    secret = apikeys.split(a.key)[1]  # type: ignore[index]
    assert apikeys.hash_secret(a.salt, secret) == a.key_hash
    assert apikeys.hash_secret(b.salt, secret) != a.key_hash
    assert secret.encode() not in a.key_hash


def test_malformed_keys_do_not_split():
    for key in ("", "imk_", "imk_XYZ_abc", "Bearer imk_0123456789ab_" + "a" * 43, "imk_0123456789ab_short"):
        assert apikeys.split(key) is None
