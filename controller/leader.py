"""Leader election on an etcd lease, and the fence that keeps a deposed leader from writing.

Controllers run N-way. Each campaigns for ``<prefix>/leader``: the one whose transaction
creates the key (bound to its own lease) leads; the others watch the key and campaign again
when it disappears (its holder resigned, or its lease expired because it died). Every write
the leader makes carries a compare on the key's create_revision, so a leader that lost the
key — paused, partitioned, or simply slow to notice — cannot change anything.

A controller that finds its own address in the key (it was SIGKILLed and restarted, or it
stepped down while etcd was away and etcd kept the lease alive) deletes the key at once
instead of waiting out the lease: no other live process can hold that address, since this
one has bound its port. The next term creates the key anew, so its fence differs.
"""

from __future__ import annotations

import asyncio
import contextlib

from etcd3aio._protobuf import Compare

from tether.controller.errors import OutOfRange
from tether.controller.store import Delete, Put, Store, mod_revision_is
from tether.sdk.telemetry import get_logger

__all__ = ["Leadership"]

log = get_logger("controller.leader")


# Pause before watching the leader key again after the watch failed, seconds.
WATCH_RETRY_SECONDS = 0.5


class Leadership:
    """One controller's claim to lead.

    Args:
        store: The etcd store.
        identity: What the leader key holds (this controller's address), so others can say
            where the leader is.
        ttl: Lease TTL, seconds: how long a dead leader blocks a successor.
        standing_by: Set when this controller finds another leading.
    """

    def __init__(
        self, store: Store, identity: str, ttl: int, standing_by: asyncio.Event | None = None
    ) -> None:
        self.store = store
        self.key = store.keys.leader
        self.identity = identity
        self.ttl = ttl
        self.revision = 0
        self.lease = 0
        # The identity in the leader key as last read ("" while unknown or free).
        self.holder = ""
        self.lost = asyncio.Event()
        # Set once another controller is seen leading (start() can return then).
        self.standing_by = standing_by or asyncio.Event()
        self._keepalive: asyncio.Task | None = None
        # Why the lease could not be renewed, when etcd failed (so the controller can say why
        # it stepped down at once, not after its next campaign times out).
        self.etcd_error = ""
        self._watch: asyncio.Task | None = None

    def fence(self) -> Compare:
        """The compare every leader write carries: the key is still the one we created."""
        return Compare(
            key=self.key.encode(),
            target=Compare.CompareTarget.CREATE,
            result=Compare.CompareResult.EQUAL,
            create_revision=self.revision,
        )

    async def leader_identity(self) -> str:
        kv = await self.store.get(self.key)
        return kv.value.decode() if kv else ""

    async def acquire(self) -> None:
        """Return once this controller leads; until then, wait for the key to be free."""
        while True:
            lease = await self.store.grant_lease(self.ttl)
            absent = Compare(
                key=self.key.encode(),
                target=Compare.CompareTarget.CREATE,
                result=Compare.CompareResult.EQUAL,
                create_revision=0,
            )
            ok, revision = await self.store.txn(
                [absent], [Put(self.key, self.identity.encode(), lease)], fenced=False
            )
            if ok:
                self.revision, self.lease = revision, lease
                self._keepalive = asyncio.create_task(self._keep_alive(), name="leader-lease")
                self._watch = asyncio.create_task(self._watch_key(), name="leader-watch")
                log.info("leading", identity=self.identity, revision=revision)
                return
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(lease)
            holder, read_at = await self.store.read(self.key)
            if holder is None:
                continue
            self.holder = holder.value.decode()
            if self.holder == self.identity:
                await self._take_back(holder)
                continue
            self.standing_by.set()
            log.info("standing by", leader=self.holder)
            # From the read, not from the key's creation: a leader's key may be older than
            # etcd's compacted history, and nothing before the read matters.
            try:
                async for ev in self.store.watch(self.key, read_at + 1):
                    if ev.key == self.key and ev.deleted:
                        self.holder = ""
                        break
            except OutOfRange:  # the watch broke and resumed past the history: read again
                continue

    async def _take_back(self, holder) -> None:
        """Delete a leader key that names this controller: its holder was this controller's
        previous process or term, and it no longer acts."""
        ok, _ = await self.store.txn(
            [mod_revision_is(self.key, holder.mod_revision)], [Delete(self.key)], fenced=False
        )
        if ok:
            log.info("taking back leadership from a previous run of this controller")
            self.holder = ""
            if holder.lease:
                with contextlib.suppress(Exception):
                    await self.store.revoke_lease(holder.lease)

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                # Bounded so that a hung call cannot keep us acting past the lease.
                if await self.store.keepalive(self.lease, timeout=self.ttl / 3, shared=False) <= 0:
                    break
                last_ok = loop.time()
            except Exception as e:  # etcd unreachable: hold on until the TTL
                log.warning("leader lease keepalive failed", error=str(e))
                why = str(e) or type(e).__name__
                self.etcd_error = f"the leader lease could not be renewed: {why}"
                if loop.time() - last_ok >= self.ttl:
                    break
            else:
                self.etcd_error = ""
        log.warning("leadership lost (lease expired)")
        self.lost.set()

    async def _watch_key(self) -> None:
        # The lease may live on while the key is gone (deleted by hand, or by an operator's
        # recovery): any change to the key after we created it means someone else may lead.
        start = self.revision + 1
        while True:
            try:
                async for ev in self.store.watch(self.key, start):
                    if ev.key == self.key:
                        log.warning("leadership lost (leader key changed)")
                        break
                break
            except asyncio.CancelledError:
                raise
            except OutOfRange:
                # The watch broke (an etcd restart) and could not resume inside the compacted
                # history: the key as it is now tells whether it is still ours.
                try:
                    kv, read_at = await self.store.read(self.key)
                except Exception as e:  # etcd away: read again shortly
                    log.warning("leader key watch failed; retrying", error=str(e))
                    await asyncio.sleep(WATCH_RETRY_SECONDS)
                    continue
                if kv is None or kv.create_revision != self.revision:
                    log.warning("leadership lost (leader key changed)")
                    break
                start = read_at + 1
            except Exception as e:
                # Watched again from where it stood (a change meanwhile is replayed, or read
                # above once compacted): the fence protects every write meanwhile, but a
                # leader whose key went away must not go on serving for lack of a watch.
                log.warning("leader key watch failed; retrying", error=str(e))
                await asyncio.sleep(WATCH_RETRY_SECONDS)
        self.lost.set()

    def abandon(self) -> None:
        """Stop renewing and watching (leadership is lost, or was never used); the lease
        expires by itself, or this controller takes its key back in its next term."""
        for task in (self._keepalive, self._watch):
            if task:
                task.cancel()
        self.lost.set()

    async def resign(self) -> None:
        """Give up leadership now (graceful shutdown), so a standby takes over at once."""
        self.abandon()
        if self.lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self.lease)
        self.lost.set()
