"""Building an assignment's secret_env from the controller's in-memory (encrypted) copy."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tether.api.v1 import types_pb2 as t
from tether.controller.secretbox import SecretBox
from tether.controller.secrets import Secrets, SecretUnavailable


def _secrets(box: SecretBox | None) -> Secrets:
    # resolve() reads only the in-memory copy; no etcd is involved.
    return Secrets(SimpleNamespace(keys=SimpleNamespace(prefix="/p")), box)  # type: ignore[arg-type]


def test_resolve_decrypts_each_reference():
    box = SecretBox(os.urandom(32))
    s = _secrets(box)
    s._remember("k", box.encrypt("k", b"value"), 5)
    spec = t.TaskSpec(name="a", env_secrets={"API_KEY": "k", "AGAIN": "k"})
    assert s.resolve(spec) == {"API_KEY": "value", "AGAIN": "value"}
    assert s.resolve(t.TaskSpec(name="b")) == {}


def test_resolve_names_a_missing_secret_and_never_a_value():
    s = _secrets(SecretBox(os.urandom(32)))
    with pytest.raises(SecretUnavailable, match=r'env\.API_KEY: secret "k" does not exist'):
        s.resolve(t.TaskSpec(name="a", env_secrets={"API_KEY": "k"}))


def test_resolve_with_another_key_says_so():
    s = _secrets(SecretBox(os.urandom(32)))
    s._remember("k", SecretBox(os.urandom(32)).encrypt("k", b"plaintext-xyz"), 5)
    with pytest.raises(SecretUnavailable, match="--secrets-key-file") as e:
        s.resolve(t.TaskSpec(name="a", env_secrets={"API_KEY": "k"}))
    assert "plaintext-xyz" not in str(e.value)


def test_without_a_key_resolve_names_the_flag():
    with pytest.raises(SecretUnavailable, match="--secrets-key-file"):
        _secrets(None).resolve(t.TaskSpec(name="a", env_secrets={"K": "k"}))


def test_an_older_revision_does_not_replace_a_newer_one():
    box = SecretBox(os.urandom(32))
    s = _secrets(box)
    s._remember("k", box.encrypt("k", b"new"), 9)
    s._remember("k", box.encrypt("k", b"old"), 3)
    s._remember("k", None, 4)
    assert s.resolve(t.TaskSpec(name="a", env_secrets={"K": "k"})) == {"K": "new"}
    s._remember("k", None, 10)
    with pytest.raises(SecretUnavailable):
        s.resolve(t.TaskSpec(name="a", env_secrets={"K": "k"}))
