"""Encryption of secret values at rest: AES-256-GCM under the controller's key.

A stored value is ``version (1 byte) | key id (8) | nonce (12) | ciphertext and tag``. The
nonce is random per value; the secret's name is the associated data, so a ciphertext copied
to another name does not decrypt. The key id (a hash of the key, not the key) tells a
controller started with another key file why a value does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "KeyFileError", "SecretBox", "UndecryptableSecret", "generate_key_file"]

KEY_BYTES = 32
_VERSION = b"\x01"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(_VERSION) + _KEY_ID_BYTES + _NONCE_BYTES


class KeyFileError(ValueError):
    """The key file is missing, unreadable or does not hold a 32-byte key."""


class UndecryptableSecret(Exception):
    """A stored value does not decrypt with this key (another key, or a damaged value)."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"tether secrets key id\x00" + key).digest()[:_KEY_ID_BYTES]


class SecretBox:
    """Encrypts and decrypts secret values with one AES-256 key.

    Args:
        key: 32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"the key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = _key_id(key)

    @classmethod
    def from_file(cls, path: str | Path) -> SecretBox:
        """Load the key from a file holding 32 raw bytes, or their base64 (one line).

        Raises:
            KeyFileError: the file cannot be read or holds no 32-byte key; the message says
                which.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
        if len(data) == KEY_BYTES:
            return cls(data)
        try:
            key = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise KeyFileError(
                f"{path} must hold {KEY_BYTES} random bytes, raw or base64 "
                f"(make one with: head -c {KEY_BYTES} /dev/urandom | base64 > {path}); "
                f"it holds {len(data)} bytes"
            )
        return cls(key)

    def encrypt(self, name: str, value: bytes) -> bytes:
        """The stored form of ``value`` for the secret ``name``."""
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + self.key_id + nonce + self._aead.encrypt(nonce, value, name.encode())

    def decrypt(self, name: str, stored: bytes) -> bytes:
        """The value of the secret ``name`` from its stored form.

        Raises:
            UndecryptableSecret: another key encrypted it, or the value is damaged.
        """
        if len(stored) < _HEADER or stored[:1] != _VERSION:
            raise UndecryptableSecret(f'secret "{name}": stored value is damaged')
        if stored[1 : 1 + _KEY_ID_BYTES] != self.key_id:
            raise UndecryptableSecret(
                f'secret "{name}" was encrypted with another key than the one in this '
                "controller's --secrets-key-file; set it again, or start with that key"
            )
        nonce = stored[1 + _KEY_ID_BYTES : _HEADER]
        try:
            return self._aead.decrypt(nonce, stored[_HEADER:], name.encode())
        except InvalidTag:
            raise UndecryptableSecret(f'secret "{name}": stored value is damaged') from None

    def can_decrypt(self, stored: bytes) -> bool:
        """Whether ``stored`` was encrypted with this key (without decrypting it)."""
        return stored[:1] == _VERSION and stored[1 : 1 + _KEY_ID_BYTES] == self.key_id


def generate_key_file(path: str | Path) -> Path:
    """Write a new random key (base64) to ``path`` with mode 0600, unless it exists."""
    p = Path(path)
    if not p.exists():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
    return p
