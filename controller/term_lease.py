"""The one etcd lease that every node record of a leadership term is attached to.

Renewing a lease per node on each heartbeat costs two gRPC messages to etcd and back per
beat — at thousands of agents most of the controller's CPU. Instead, the leader attaches the
records of the nodes that register with it to one lease of its own, renews that lease every
TTL/3, and keeps each node's liveness in memory (:class:`tether.controller.nodes.Nodes`
deletes the record of a node whose agent stopped beating for a TTL, in one transaction). A
node is lost when it was before: a TTL after its last heartbeat; and if the controller
cannot reach etcd for a TTL, every record expires with the lease, as every node's lease did.
"""

from __future__ import annotations

import asyncio
import time

from tether.controller.store import Store
from tether.sdk.telemetry import get_logger

__all__ = ["TermLease"]

log = get_logger("controller.engine")


class TermLease:
    """Grants the term's lease on first use and keeps it alive.

    Args:
        store: Where the lease lives.
        ttl: The lease's TTL, seconds (the configured ``lease_ttl``).
    """

    def __init__(self, store: Store, ttl: int) -> None:
        self.store = store
        self.ttl = ttl
        self.id = 0
        # time.monotonic() until which etcd keeps the lease at least (from a renewal's send).
        self._alive_until = 0.0
        self._lock = asyncio.Lock()

    def confirmed(self, now: float) -> bool:
        """Whether etcd confirmed the lease recently enough to vouch for a heartbeat: at most
        one renewal (TTL/3) may have been missed, so an ack still means "etcd was reached"."""
        return self.id != 0 and self._alive_until - now > self.ttl / 3

    async def get(self) -> int:
        """The current lease, granted now if there is none (or it expired)."""
        if self.id and self._alive_until > time.monotonic():
            return self.id
        async with self._lock:
            if not (self.id and self._alive_until > time.monotonic()):
                sent = time.monotonic()
                self.id = await self.store.grant_lease(self.ttl)
                self._alive_until = sent + self.ttl
                log.info("node lease granted", lease=self.id, ttl=self.ttl)
            return self.id

    async def check(self, lease: int) -> None:
        """After a write on ``lease`` failed: forget the lease if it has expired (revoked, or
        etcd was away for a TTL), so that the next :meth:`get` grants another at once."""
        try:
            sent = time.monotonic()
            ttl = await self.store.keepalive(lease, timeout=self.ttl / 3)
        except Exception:  # etcd away: the renewals find out later
            return
        if lease == self.id:
            self._renewed(lease, sent, ttl)

    def _renewed(self, lease: int, sent: float, ttl: int) -> None:
        if ttl > 0:
            self._alive_until = sent + ttl
        else:
            # Expired: etcd deleted every record on it, and the node watch loses those
            # nodes; the agents register again, under a new lease.
            log.warning("node lease expired", lease=lease)
            self.id = 0
            self._alive_until = 0.0

    async def keep_alive(self) -> None:
        """Renew the lease every TTL/3 (sooner after a failed renewal) until cancelled."""
        period = self.ttl / 3
        delay = period
        while True:
            await asyncio.sleep(delay)
            delay = period
            lease = self.id
            if not lease:
                continue
            sent = time.monotonic()
            try:
                ttl = await self.store.keepalive(lease, timeout=period)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd away: try again soon, the lease may still live
                log.warning("node lease renewal failed", lease=lease, error=str(e) or repr(e))
                delay = min(1.0, period / 3)
                continue
            if lease == self.id:
                self._renewed(lease, sent, ttl)
