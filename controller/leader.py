"""Leader election on an etcd lease, and the fence that keeps a deposed leader from writing.

Controllers run N-way. Each campaigns for ``<prefix>/leader``: the one whose transaction
creates the key (bound to its own lease) leads; the others watch the key and campaign again
when it disappears (its holder resigned, or its lease expired because it died). Every write
the leader makes carries a compare on the key's create_revision, so a leader that lost the
key — paused, partitioned, or simply slow to notice — cannot change anything.
"""

from __future__ import annotations

import asyncio
import contextlib

from etcd3aio._protobuf import Compare

from tether.controller.store import Put, Store
from tether.sdk.telemetry import get_logger

__all__ = ["Leadership"]

log = get_logger("controller.leader")


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
        self.lost = asyncio.Event()
        # Set once another controller is seen leading (start() can return then).
        self.standing_by = standing_by or asyncio.Event()
        self._keepalive: asyncio.Task | None = None
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
            self.standing_by.set()
            holder = await self.store.get(self.key)
            if holder is None:
                continue
            log.info("standing by", leader=holder.value.decode())
            async for ev in self.store.watch(self.key, holder.mod_revision + 1):
                if ev.key == self.key and ev.deleted:
                    break

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.store.keepalive(self.lease) <= 0:
                    break
                last_ok = loop.time()
            except Exception as e:  # etcd unreachable: hold on until the TTL
                log.warning("leader lease keepalive failed", error=str(e))
                if loop.time() - last_ok >= self.ttl:
                    break
        log.warning("leadership lost (lease expired)")
        self.lost.set()

    async def _watch_key(self) -> None:
        # The lease may live on while the key is gone (deleted by hand, or by an operator's
        # recovery): any change to the key after we created it means someone else may lead.
        try:
            async for ev in self.store.watch(self.key, self.revision + 1):
                if ev.key == self.key:
                    log.warning("leadership lost (leader key changed)")
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the fence still protects every write
            log.warning("leader key watch failed", error=str(e))
            return
        self.lost.set()

    async def resign(self) -> None:
        """Give up leadership now (graceful shutdown), so a standby takes over at once."""
        for task in (self._keepalive, self._watch):
            if task:
                task.cancel()
        if self.lease:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self.lease)
        self.lost.set()
