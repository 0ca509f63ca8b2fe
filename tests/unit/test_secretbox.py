"""The encryption of secret values at rest (tether.controller.secretbox)."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from tether.controller.secretbox import (
    KeyFileError,
    SecretBox,
    UndecryptableSecret,
    generate_key_file,
)


def test_round_trip_and_not_plaintext():
    box = SecretBox(os.urandom(32))
    stored = box.encrypt("api", b"hunter2-value")
    assert b"hunter2-value" not in stored
    assert box.decrypt("api", stored) == b"hunter2-value"


def test_random_nonce_per_value():
    box = SecretBox(os.urandom(32))
    assert box.encrypt("a", b"same") != box.encrypt("a", b"same")


def test_name_is_associated_data():
    box = SecretBox(os.urandom(32))
    stored = box.encrypt("a", b"v")
    with pytest.raises(UndecryptableSecret, match="damaged"):
        box.decrypt("b", stored)


def test_tampered_value_is_refused():
    box = SecretBox(os.urandom(32))
    stored = bytearray(box.encrypt("a", b"value"))
    stored[-1] ^= 1
    with pytest.raises(UndecryptableSecret, match="damaged"):
        box.decrypt("a", bytes(stored))
    with pytest.raises(UndecryptableSecret, match="damaged"):
        box.decrypt("a", b"\x01short")


def test_other_key_is_named_in_the_error():
    stored = SecretBox(os.urandom(32)).encrypt("a", b"v")
    other = SecretBox(os.urandom(32))
    assert not other.can_decrypt(stored)
    with pytest.raises(UndecryptableSecret, match="--secrets-key-file"):
        other.decrypt("a", stored)


def test_key_file_raw_or_base64(tmp_path):
    key = os.urandom(32)
    raw = tmp_path / "raw"
    raw.write_bytes(key)
    b64 = tmp_path / "b64"
    b64.write_text(base64.b64encode(key).decode() + "\n")
    stored = SecretBox.from_file(raw).encrypt("n", b"v")
    assert SecretBox.from_file(b64).decrypt("n", stored) == b"v"


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 31, base64.b64encode(b"k" * 16)])
def test_bad_key_file_says_what_it_needs(tmp_path, content):
    p = tmp_path / "key"
    p.write_bytes(content)
    with pytest.raises(KeyFileError, match="32 random bytes, raw or base64"):
        SecretBox.from_file(p)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        SecretBox.from_file(tmp_path / "nope")


def test_generate_key_file_is_private_and_kept(tmp_path):
    p = generate_key_file(tmp_path / "secrets.key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    first = p.read_bytes()
    SecretBox.from_file(p)
    generate_key_file(p)
    assert p.read_bytes() == first
