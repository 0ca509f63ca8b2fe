"""Compaction of etcd's history by the leading controller, as kube-apiserver does it.

etcd keeps every revision of every key until its history is compacted. A mesh writes about
three puts per task, so without compaction etcd's database grows until it reaches its quota
(2 GiB by default) and etcd refuses every write (alarm NOSPACE); deleting old runs
(``retention``) frees nothing until then either. Every ``etcd_compaction_interval`` the
leader compacts up to the revision it read one interval before, so that a watch resuming
from an older revision (``tether watch --from-revision``, a controller catching up) has at
least one interval of history. 0 turns this off, for an etcd that compacts itself
(``--auto-compaction-retention``).
"""

from __future__ import annotations

import asyncio

from etcd3aio.errors import EtcdPermissionDeniedError

from tether.controller.store import Store
from tether.sdk.telemetry import get_logger

__all__ = ["Compactor"]

log = get_logger("controller.compaction")


class Compactor:
    """Compacts etcd every ``interval`` seconds, keeping the last interval's history."""

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.compacted = 0  # the revision compacted to last (0: none yet)

    async def loop(self) -> None:
        """Compact every interval until cancelled, or until etcd refuses this user."""
        previous = 0
        while True:
            try:
                previous = await self.step(previous)
            except asyncio.CancelledError:
                raise
            except EtcdPermissionDeniedError as e:
                log.warning(
                    "etcd refuses compaction to this controller's user: enable etcd's "
                    "--auto-compaction-retention, or its database fills up",
                    error=str(e),
                )
                return
            except Exception as e:  # etcd away: try again next interval, from what is known
                log.warning("etcd compaction failed", error=str(e))
            await asyncio.sleep(self.interval)

    async def step(self, previous: int) -> int:
        """Compact up to ``previous`` (read one interval ago; 0: nothing yet); return the
        revision to compact up to next time."""
        current = await self.store.revision()
        if current < self.compacted:
            # etcd's revisions went back (rebuilt from scratch): start counting again.
            self.compacted = 0
        if self.compacted < previous <= current:
            if await self.store.compact(previous):
                log.info("compacted etcd", revision=previous)
            self.compacted = previous
        return current
