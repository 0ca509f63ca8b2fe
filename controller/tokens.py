"""User tokens in etcd: create, bootstrap once, list, revoke, and look up on every call.

A token is ``<name>.<64 hex digits>``; etcd keeps only its SHA-256, under
``<prefix>/tokens/<name>``, with the role and times. The name in the token finds the record
with one read, and the hash proves the rest.

Every check reads etcd (a linearizable read, etcd's default): once a revoke has been
committed, no controller on that etcd accepts the token again, with no cache to go stale.
One read per authenticated call is a small price next to the calls themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from google.protobuf.timestamp_pb2 import Timestamp

from tether.api.v1 import types_pb2 as t
from tether.controller.auth import Principal, Role
from tether.controller.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unauthenticated,
)
from tether.controller.store import Delete, Put, Store, mod_revision_is
from tether.sdk.errors import FieldViolation, InvalidSpecError

__all__ = ["TokenStore", "hash_token"]

_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,63}")
# A bearer token is at most this long; longer ones are refused before any hashing.
_MAX_TOKEN = 200


def hash_token(token: str) -> bytes:
    """SHA-256 of a token: enough for 256 random bits, which no dictionary can guess."""
    return hashlib.sha256(token.encode()).digest()


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidSpecError(
            [FieldViolation("name", "use 1-64 of letters, digits, '-', '_', '@', '.'")]
        )


class TokenStore:
    """Tokens under one prefix of the store.

    Args:
        store: The controller's etcd store (its prefix is used).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.prefix = f"{store.keys.prefix}/tokens/"
        self.bootstrap_key = f"{store.keys.prefix}/acl/bootstrapped"

    def _key(self, name: str) -> str:
        return self.prefix + name

    @staticmethod
    def _new(name: str, role: Role, ttl: float, created_by: str) -> tuple[str, t.TokenRecord]:
        token = f"{name}.{secrets.token_hex(32)}"
        info = t.TokenInfo(name=name, role=role.label, created_by=created_by)
        now = time.time()
        info.created_at.FromNanoseconds(int(now * 1e9))
        if ttl > 0:
            info.expires_at.FromNanoseconds(int((now + ttl) * 1e9))
        return token, t.TokenRecord(info=info, sha256=hash_token(token))

    async def bootstrap(self, name: str) -> tuple[str, t.TokenInfo]:
        """Create the first admin token, once per prefix: the marker key is created in the
        same transaction, only if absent, so two bootstraps racing cannot both succeed."""
        name = name or "admin"
        check_name(name)
        token, record = self._new(name, Role.ADMIN, 0, "")
        ok, _ = await self.store.txn(
            [mod_revision_is(self.bootstrap_key, 0), mod_revision_is(self._key(name), 0)],
            [
                Put(self.bootstrap_key, record.info.created_at.ToJsonString().encode()),
                Put(self._key(name), record.SerializeToString()),
            ],
            fenced=False,
        )
        if not ok:
            raise FailedPrecondition(
                "the ACL is already bootstrapped: ask an admin for a token "
                "(tether tokens create NAME --role ROLE)"
            )
        return token, record.info

    async def create(
        self, name: str, role_name: str, ttl: float, created_by: str
    ) -> tuple[str, t.TokenInfo]:
        """Create a token; its name must be new."""
        check_name(name)
        try:
            role = Role.parse(role_name)
        except ValueError as e:
            raise InvalidSpecError([FieldViolation("role", str(e))]) from None
        if ttl < 0:
            raise InvalidSpecError([FieldViolation("ttl", "must not be negative")])
        token, record = self._new(name, role, ttl, created_by)
        ok, _ = await self.store.txn(
            [mod_revision_is(self._key(name), 0)],
            [Put(self._key(name), record.SerializeToString())],
            fenced=False,
        )
        if not ok:
            raise AlreadyExists(f"a token named {name!r} exists; revoke it first")
        return token, record.info

    async def list(self) -> list[t.TokenInfo]:
        kvs, _ = await self.store.range(self.prefix)
        return [t.TokenRecord.FromString(kv.value).info for kv in kvs]

    async def revoke(self, name: str) -> None:
        check_name(name)
        key = self._key(name)
        kv = await self.store.get(key)
        if kv is None:
            raise NotFound(f"no token named {name!r}")
        # Deleting only the version read: a token re-created meanwhile stays.
        ok, _ = await self.store.txn(
            [mod_revision_is(key, kv.mod_revision)], [Delete(key)], fenced=False
        )
        if not ok:
            raise NotFound(f"no token named {name!r}")

    async def authenticate(self, token: str) -> Principal:
        """The holder of ``token``; Unauthenticated when it is malformed, unknown, revoked or
        expired (the message does not say which name exists, only that this token fails)."""
        name, dot, _ = token.rpartition(".")
        if not dot or len(token) > _MAX_TOKEN or not _NAME.fullmatch(name):
            raise Unauthenticated("malformed token; expected the token tether printed")
        kv = await self.store.get(self._key(name))
        if kv is None:
            raise Unauthenticated(f"token {name!r} is not valid (revoked or never created)")
        record = t.TokenRecord.FromString(kv.value)
        if not hmac.compare_digest(record.sha256, hash_token(token)):
            raise Unauthenticated(f"token {name!r} is not valid (revoked or never created)")
        info = record.info
        if info.HasField("expires_at") and _expired(info.expires_at):
            raise Unauthenticated(f"token {name!r} expired at {info.expires_at.ToJsonString()}")
        return Principal(name, Role.parse(info.role))


def _expired(ts: Timestamp) -> bool:
    return ts.ToNanoseconds() <= time.time_ns()
