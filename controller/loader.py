"""Taking runs from etcd into the cache: all unfinished runs at start, one run on demand, and
a fresh copy of a run after someone else wrote it (a lost compare-and-swap). Each loaded run
is reconciled: what can run is readied, what cannot is skipped, timers are armed again.
"""

from __future__ import annotations

import asyncio
import random
import time

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.attempts import Attempts
from tether.controller.cache import Cache
from tether.controller.cancel import Cancels
from tether.controller.committer import Committer
from tether.controller.depends_on import restore as restore_depends_on
from tether.controller.dispatch import Dispatch
from tether.controller.progress import Progress
from tether.controller.records import RunEntry, TaskEntry
from tether.controller.run_watch import RunWatch
from tether.controller.store import Store
from tether.sdk.telemetry import get_logger

__all__ = ["Loader"]

# Pauses between tries of a run's reload while etcd does not answer, seconds.
RELOAD_RETRY_FIRST = 0.1
RELOAD_RETRY_MOST = 2.0
log = get_logger("controller.engine")


class Loader:
    """Loads and reloads runs from etcd, and brings each loaded run forward."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        committer: Committer,
        progress: Progress,
        attempts: Attempts,
        cancels: Cancels,
        dispatch: Dispatch,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.committer = committer
        self.progress = progress
        self.attempts = attempts
        self.cancels = cancels
        # Told what a reload reads of a run record (set by the engine).
        self.run_watch: RunWatch | None = None
        self.dispatch = dispatch
        self._loading: dict[str, asyncio.Future] = {}
        self._reloads: set[asyncio.Task] = set()

    async def load_unfinished(self) -> int:
        """Cache every unfinished run; return the etcd revision they were read at."""
        runs, revision = await self.store.range(self.keys.runs)
        for kv in runs:
            msg = t.Run.FromString(kv.value)
            if msg.state in lc.RUN_TERMINAL:
                continue
            await self._load_run(msg, kv.mod_revision)
        return revision

    async def _load_run(self, msg: t.Run, rev: int, replacing: RunEntry | None = None) -> RunEntry:
        tasks, _ = await self.store.range(self.keys.tasks_of(msg.id))
        run = RunEntry(self.keys.run(msg.id), msg, rev)
        for kv in tasks:
            tm = t.TaskRun.FromString(kv.value)
            run.tasks[tm.spec.name] = TaskEntry(kv.key, tm, kv.mod_revision, committed=kv.value)
        await restore_depends_on(self.store, (e.msg for e in run.tasks.values()))
        for e in run.tasks.values():
            for dep in e.msg.spec.depends_on:
                if dep in run.tasks:
                    run.tasks[dep].children.append(e.msg.spec.name)
            if e.msg.state not in lc.TASK_TERMINAL:
                run.unfinished += 1
        if replacing is not None:
            # Only now, with the new copy charged in the same turn of the loop: until then
            # the old copy's attempts (still running) keep their nodes' resources.
            self.cache.release(replacing)
        self.cache.add_run(run)
        return run

    async def ensure_loaded(self, run_id: str) -> RunEntry | None:
        """The cached run; an unfinished run found only in etcd is loaded and reconciled."""
        if run_id in self.cache.runs:
            return self.cache.runs[run_id]
        if run_id in self._loading:  # one load per run, however many callers ask
            return await asyncio.shield(self._loading[run_id])
        fut = self._loading[run_id] = asyncio.get_running_loop().create_future()
        try:
            run = None
            kv = await self.store.get(self.keys.run(run_id))
            if kv is not None and run_id not in self.cache.runs:
                msg = t.Run.FromString(kv.value)
                if msg.state not in lc.RUN_TERMINAL:
                    run = await self._load_run(msg, kv.mod_revision)
                    self.reconcile(run)
                    self.cache.kick()
            run = self.cache.runs.get(run_id, run)
            fut.set_result(run)
            return run
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: later waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[run_id]

    def reconcile(self, run: RunEntry) -> None:
        """Bring a loaded run forward: ready what can run, skip what can't, re-arm timers."""
        self.cancels.arm_deadline(run)
        self.cancels.cancel_requested_tasks(run)
        for e in sorted(run.tasks.values(), key=lambda x: x.msg.index):
            m = e.msg
            if m.state == lc.PENDING:
                self.progress.advance(run, e)
            elif m.state == lc.READY:
                self.cache.enqueue((run.msg.id, m.spec.name))
            elif m.state in (lc.RETRYING, lc.LOST, lc.PREEMPTED):
                delay = max(0.0, m.not_before.ToNanoseconds() / 1e9 - time.time())
                self.attempts.arm_retry(run, e, delay if m.state in (lc.RETRYING, lc.LOST) else 0.0)
            elif m.state == lc.SCHEDULED:
                # The assignment may never have left (its write's reply was lost, say); agents
                # ignore a repeated one. Without a session, registration sends it.
                self.dispatch.assign(run, e)
        self.progress.finish_run_if_done(run)

    def on_conflict(self, records: list) -> None:
        """The committer lost a compare-and-swap on these records: reload their runs."""
        run_ids = set()
        for r in records:
            if isinstance(r, RunEntry):
                run_ids.add(r.msg.id)
            elif isinstance(r, TaskEntry):
                run_ids.add(r.msg.run_id)
        for run_id in run_ids - self.cache.reloading:
            self.cache.reloading.add(run_id)
            task = asyncio.get_running_loop().create_task(self._reload(run_id))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    def stop(self) -> None:
        """Cancel the reloads under way (the engine is stopping)."""
        for task in self._reloads:
            task.cancel()

    async def _reload(self, run_id: str) -> None:
        """Someone else wrote this run: drop the cached copy and rebuild it from etcd.

        A read that fails (etcd away) is tried again, the run staying marked as reloading
        meanwhile: reports for it wait to be sent again rather than being acknowledged for a
        run this controller no longer holds, and the run is not left out of its memory.
        """
        try:
            old = self.cache.take_run(run_id)
            run_key, tasks_prefix = self.keys.run(run_id), self.keys.tasks_of(run_id)
            self.committer.forget(lambda k: k == run_key or k.startswith(tasks_prefix))
            delay = RELOAD_RETRY_FIRST
            while True:
                try:
                    if not await self._read_again(run_id, old) and old is not None:
                        self.cache.release(old)  # not cached again (gone, or finished)
                    return
                except Exception as e:  # etcd away: try again, never drop the run
                    log.warning("cannot reload a run; retrying", run_id=run_id, error=str(e))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, RELOAD_RETRY_MOST)
        finally:
            self.cache.reloading.discard(run_id)

    async def _read_again(self, run_id: str, old: RunEntry | None) -> bool:
        """Read the run from etcd and cache it again (replacing ``old``); False when it is
        not cached again (gone, or finished)."""
        run_key = self.keys.run(run_id)
        kv = await self.store.get(run_key)
        if kv is None:
            if self.run_watch is not None:
                self.run_watch.gone(run_id)
            return False
        if self.run_watch is not None:
            # The write that conflicted may have been ours, committed with its reply lost:
            # waiters learn what etcd holds, its final state included.
            self.run_watch.read(run_id, kv.value, kv.mod_revision)
        msg = t.Run.FromString(kv.value)
        if msg.state in lc.RUN_TERMINAL:
            return False  # finished runs are read from etcd, not cached
        run = await self._load_run(msg, kv.mod_revision, replacing=old)
        run.committed = kv.value
        self.reconcile(run)
        self.cache.kick()
        return True
