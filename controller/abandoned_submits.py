"""Abandoned submits: the half-written tasks of a large submit that died before its commit and
that nobody retried are deleted once the submit is ``pending_submit_ttl`` old.

A run too big for one etcd transaction is written under a request key holding
``<run id> <fingerprint> pending`` (see :class:`~tether.controller.submit.Submitter`). Until
its commit nothing reads those tasks; a retry with the same request id finishes them. When no
retry ever comes (the client gave up, or died too), they would stay in etcd for good, unread:
up to 200,000 keys per run. The run id starts with its creation time in ms, which gives the
submit's age without another key.

A submit still writing (a slow one, or a retry that resumed it) cannot leave keys behind
after its pending key is deleted: each of its chunk transactions compares that key's
revision, so they fail from the deletion on, and the submit answers ABORTED ("retry").
"""

from __future__ import annotations

import time

from tether.controller.store import Delete, Store, mod_revision_is
from tether.controller.timers import every
from tether.sdk.telemetry import get_logger

__all__ = ["AbandonedSubmits", "created_at"]

log = get_logger("controller.engine")

PENDING = b" pending"
# Longest pause between passes: a pass reads every request key, one per run etcd holds.
MAX_PERIOD = 600.0


def created_at(run_id: str) -> float | None:
    """When the run with this id was created (Unix seconds), None if the id does not say:
    ids are 12 hex digits of ms since the epoch, then random ones."""
    try:
        return int(run_id[:12], 16) / 1000
    except ValueError:
        return None


class AbandonedSubmits:
    """Deletes large submits left pending for longer than ``ttl`` seconds (0: never)."""

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.keys = store.keys
        self.ttl = ttl

    async def loop(self) -> None:
        """Run a pass every quarter of the ttl (within 0.5 s-10 min), until cancelled."""
        period = min(max(self.ttl / 4, 0.5), MAX_PERIOD)
        await every(period, self.collect, "pass over abandoned submits")

    async def collect(self, ttl: float | None = None) -> int:
        """One pass; return how many abandoned submits were deleted.

        Args:
            ttl: Age past which a pending submit is abandoned (default: the configured one).
        """
        cutoff = time.time() - (self.ttl if ttl is None else ttl)
        deleted = 0
        async for page, _ in self.store.pages(self.keys.requests):
            for kv in page:
                if not kv.value.endswith(PENDING):
                    continue
                run_id = kv.value.decode(errors="replace").partition(" ")[0]
                created = created_at(run_id)
                if created is None or created > cutoff:
                    continue
                # Compare: still the same pending submit (no retry committed it meanwhile),
                # and no run record under its id (nothing of it was ever visible).
                ok, _ = await self.store.txn(
                    [
                        mod_revision_is(kv.key, kv.mod_revision),
                        mod_revision_is(self.keys.run(run_id), 0),
                    ],
                    [
                        Delete(kv.key),
                        Delete(self.keys.tasks_of(run_id), prefix=True),
                        Delete(self.keys.deps_of(run_id), prefix=True),
                    ],
                )
                if ok:
                    deleted += 1
                    log.info(
                        "deleted an abandoned submit",
                        run_id=run_id,
                        age_s=round(time.time() - created, 1),
                    )
        return deleted
