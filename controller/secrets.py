"""Secrets: named values stored encrypted in etcd and handed to tasks as environment variables.

Stored at ``<prefix>/secrets/<name>`` in the form :mod:`~tether.controller.secretbox` makes.
The controller keeps the stored (encrypted) values in memory, kept current by a watch, so
that building an assignment, which must not wait, can decrypt without reading etcd. Only
:meth:`Secrets.resolve` ever sees a plaintext value, and it hands it straight to the
assignment: nothing here logs, traces or returns one.
"""

from __future__ import annotations

import asyncio

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import FailedPrecondition, NotFound
from tether.controller.secretbox import SecretBox, UndecryptableSecret
from tether.controller.store import Delete, Put, Store
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.telemetry import get_logger
from tether.sdk.validation import SECRET_NAME

__all__ = ["MAX_SECRET_BYTES", "NO_KEY", "SecretUnavailable", "Secrets"]

log = get_logger("controller.secrets")

# A secret becomes one environment variable; the kernel limits one to 128 KiB, and a task
# needs room for the rest of its environment and arguments.
MAX_SECRET_BYTES = 32 * 1024

NO_KEY = "secrets are off: start the controller with --secrets-key-file (32 random bytes)"


class SecretUnavailable(Exception):
    """A task's secret cannot be given to it now (deleted since submit, or another key)."""


def _check_name(name: str) -> None:
    if not SECRET_NAME.match(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidSpecError(
            [FieldViolation("name", f"{shown!r} must match {SECRET_NAME.pattern}")]
        )


class Secrets:
    """The secrets of one mesh (one etcd prefix).

    Args:
        store: The etcd store.
        box: Encrypts and decrypts values; None when the controller has no key file, which
            turns every secrets request into FAILED_PRECONDITION.
    """

    def __init__(self, store: Store, box: SecretBox | None) -> None:
        self.store = store
        self.box = box
        self.prefix = f"{store.keys.prefix}/secrets/"
        # Encrypted values by name, with the mod_revision they were read at.
        self._stored: dict[str, tuple[bytes, int]] = {}

    def _box(self) -> SecretBox:
        if self.box is None:
            raise FailedPrecondition(NO_KEY)
        return self.box

    def _remember(self, name: str, value: bytes | None, revision: int) -> None:
        """Keep what etcd holds for ``name`` unless a newer revision is already known."""
        known = self._stored.get(name)
        if known is not None and known[1] > revision:
            return
        if value is None:
            self._stored.pop(name, None)
        else:
            self._stored[name] = (value, revision)

    # Keeping the in-memory copy current ---------------------------------------------------

    async def load(self) -> int:
        """Read every stored secret; return the read's revision."""
        kvs, revision = await self.store.range(self.prefix)
        self._stored = {kv.key[len(self.prefix) :]: (kv.value, kv.mod_revision) for kv in kvs}
        return revision

    async def follow(self) -> None:
        """Load, then apply every change from etcd until cancelled (reloading after errors)."""
        while True:
            try:
                revision = await self.load()
                async for ev in self.store.watch(self.prefix, revision + 1):
                    name = ev.key[len(self.prefix) :]
                    self._remember(name, None if ev.deleted else ev.value, ev.revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # compacted, or etcd away: reload from scratch
                log.warning("secrets watch failed; reloading", error=str(e))
                await asyncio.sleep(1.0)

    # Requests -----------------------------------------------------------------------------

    async def set(self, name: str, value: bytes) -> bool:
        """Store ``value`` encrypted as ``name``; return whether it replaced a value."""
        box = self._box()
        _check_name(name)
        problem = ""
        if not value:
            problem = "must not be empty"
        elif len(value) > MAX_SECRET_BYTES:
            problem = f"is {len(value)} bytes; at most {MAX_SECRET_BYTES}"
        elif b"\0" in value:
            problem = "must not contain a NUL byte"
        else:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                problem = "must be UTF-8 text"
        if problem:
            raise InvalidSpecError([FieldViolation("value", problem)])
        key = self.prefix + name
        stored = box.encrypt(name, value)
        existed = await self.store.get(key) is not None
        _, revision = await self.store.txn([], [Put(key, stored)], fenced=False)
        self._remember(name, stored, revision)
        log.info("secret set", secret=name, replaced=existed)
        return existed

    async def names(self) -> list[str]:
        """Every secret's name, sorted."""
        self._box()
        kvs, _ = await self.store.range(self.prefix)
        return sorted(kv.key[len(self.prefix) :] for kv in kvs)

    async def delete(self, name: str) -> None:
        """Delete the secret ``name``; NotFound when there is none."""
        self._box()
        _check_name(name)
        key = self.prefix + name
        if await self.store.get(key) is None:
            raise NotFound(f'secret "{name}" does not exist')
        _, revision = await self.store.txn([], [Delete(key)], fenced=False)
        self._remember(name, None, revision)
        log.info("secret deleted", secret=name)

    async def check(self, spec: t.WorkflowSpec) -> None:
        """At submit: every secret the tasks refer to exists and decrypts with our key.

        Raises:
            FailedPrecondition: the spec refers to secrets and the controller has no key.
            InvalidSpecError: naming each ``tasks[i] (name).env.VAR`` whose secret is missing
                or was encrypted with another key.
        """
        refs = [
            (i, ts, var, s)
            for i, ts in enumerate(spec.tasks)
            if ts.env_secrets  # cheaper than .items() on each of 100,000 empty maps
            for var, s in ts.env_secrets.items()
        ]
        if not refs:
            return
        box = self._box()
        found: dict[str, bytes | None] = {}
        for name in sorted({r[3] for r in refs}):
            kv = await self.store.get(self.prefix + name)
            found[name] = kv.value if kv else None
            # What a submit saw is at least as new as the watch: assignments follow it.
            self._remember(name, kv.value if kv else None, kv.mod_revision if kv else 0)
        problems = []
        for i, ts, var, name in refs:
            stored = found[name]
            if stored is None:
                why = f'secret "{name}" does not exist'
            elif not box.can_decrypt(stored):
                why = f'secret "{name}" was encrypted with another --secrets-key-file; set it again'
            else:
                continue
            problems.append(FieldViolation(f"tasks[{i}] ({ts.name}).env.{var}", why))
        if problems:
            raise InvalidSpecError(problems)

    def resolve(self, spec: t.TaskSpec) -> dict[str, str]:
        """The decrypted values of ``spec.env_secrets``, by variable name.

        Raises:
            SecretUnavailable: a secret is gone or does not decrypt; the message names it,
                never its value.
        """
        if not spec.env_secrets:
            return {}
        if self.box is None:
            raise SecretUnavailable(NO_KEY)
        out = {}
        for var, name in spec.env_secrets.items():
            known = self._stored.get(name)
            if known is None:
                raise SecretUnavailable(f'env.{var}: secret "{name}" does not exist (deleted?)')
            try:
                out[var] = self.box.decrypt(name, known[0]).decode("utf-8")
            except (UndecryptableSecret, UnicodeDecodeError) as e:
                raise SecretUnavailable(f"env.{var}: {e}") from None
        return out
