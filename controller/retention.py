"""Retention: finished runs older than the configured retention are deleted from etcd, with
their tasks and request id, so etcd does not grow forever.
"""

from __future__ import annotations

import time

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.store import Delete, Store, mod_revision_is
from tether.controller.timers import every
from tether.sdk.telemetry import get_logger

__all__ = ["Retention"]

log = get_logger("controller.engine")


class Retention:
    """Deletes finished runs past ``retention`` seconds."""

    def __init__(self, store: Store, cache: Cache, retention: float) -> None:
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.retention = retention

    async def loop(self) -> None:
        """Run a pass every so often (a quarter of the retention, within 0.5 s-60 s)."""
        period = min(max(self.retention / 4, 0.5), 60.0)
        await every(period, self.collect_garbage, "retention pass")

    async def collect_garbage(self) -> int:
        """One retention pass; return how many finished runs were deleted."""
        cutoff = time.time() - self.retention
        kvs, _ = await self.store.range(self.keys.runs)
        deleted = 0
        for kv in kvs:
            msg = t.Run.FromString(kv.value)
            if msg.state not in lc.RUN_TERMINAL or msg.id in self.cache.runs:
                continue
            if msg.finished_at.ToNanoseconds() / 1e9 > cutoff:
                continue
            ops = [
                Delete(kv.key),
                Delete(self.keys.tasks_of(msg.id), prefix=True),
                Delete(self.keys.deps_of(msg.id), prefix=True),
            ]
            if msg.request_id:
                ops.append(Delete(self.keys.request(msg.request_id)))
            # Compare: the run is still the finished record we read (nobody revived it).
            ok, _ = await self.store.txn([mod_revision_is(kv.key, kv.mod_revision)], ops)
            deleted += ok
        if deleted:
            log.info("deleted finished runs past retention", runs=deleted)
        return deleted
