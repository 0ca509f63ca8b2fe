"""Reads for clients: runs and tasks (from the cache while unfinished, else from etcd), pages
of runs, and the change stream of one run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.depends_on import restore as restore_depends_on
from tether.controller.errors import NotFound
from tether.controller.records import RunEntry, TaskEntry
from tether.controller.run_watch import RunWatch
from tether.controller.store import Event, KeyValue, Store

__all__ = ["Queries"]

# How long a run change waits for the task watch to catch up with it before the task changes
# up to it are read from etcd instead (the watches run apart by milliseconds).
HOLD_SECONDS = 0.1


def _by_index(tasks) -> list[t.TaskRun]:
    return sorted(tasks, key=lambda m: m.index)


async def _add_tasks(
    store: Store, run: t.Run, run_id: str, revision: int = 0, seen: dict[str, int] | None = None
) -> None:
    """Read run ``run_id``'s task records into ``run.tasks``, in the order of their index (at
    ``revision``; ``seen``: gets each key's mod_revision).

    A page at a time, each parsed straight into the run's own field: a message parsed on its
    own has an arena of its own, ≈ 2.6 KB however small the record, and the whole key list of
    a 100,000-task run is another 50 MB; both were most of the GetRun of such a run.
    """
    pages = store.pages(store.keys.tasks_of(run_id), revision=revision)
    async with contextlib.aclosing(pages):
        async for page, read_at in pages:
            revision = read_at  # every page, and the depends_on parts, at the first's revision
            for kv in page:
                run.tasks.add().MergeFromString(kv.value)
                if seen is not None:
                    seen[kv.key] = kv.mod_revision
    run.tasks.sort(key=lambda m: m.index)
    await restore_depends_on(store, run.tasks, revision)


class Queries:
    """Answers reads of runs and tasks."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        run_watch: RunWatch | None = None,
        pending: Callable[[str], bool] = lambda key: False,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.run_watch = run_watch
        # Whether a record's change is still on its way to etcd (the committer's): reads of
        # cached runs answer what etcd holds, never a state a failover could take back.
        self.pending = pending

    def _run_msg(self, entry: RunEntry) -> t.Run:
        if entry.committed and self.pending(entry.key):
            return t.Run.FromString(entry.committed)
        return entry.msg

    def _task_msg(self, e: TaskEntry) -> t.TaskRun:
        if not (e.committed and self.pending(e.key)):
            return e.msg
        m = t.TaskRun.FromString(e.committed)
        if m.depends_on_parts:  # stored apart; the spec never changes
            m.spec.depends_on[:] = e.msg.spec.depends_on
            m.depends_on_parts = 0
        return m

    async def get_run(
        self, run_id: str, with_tasks: bool = True, out: t.Run | None = None
    ) -> t.Run:
        """Return a run (from the cache, or etcd for finished runs no longer cached).

        ``out``: the message to fill and return (a response's field, say: a big run is then
        not built once more to be copied there).

        Raises:
            NotFound: no such run.
        """
        out = t.Run() if out is None else out
        entry = self.cache.runs.get(run_id)
        if entry is not None:
            out.CopyFrom(self._run_msg(entry))
            if with_tasks:
                out.tasks.extend(_by_index(self._task_msg(e) for e in entry.tasks.values()))
            return out
        kv = await self.store.get(self.keys.run(run_id))
        if kv is None:
            raise NotFound(f"run {run_id!r} not found")
        out.ParseFromString(kv.value)
        if with_tasks:
            await _add_tasks(self.store, out, run_id)
        return out

    async def get_task(self, run_id: str, task: str) -> t.TaskRun:
        """Return one task of a run (from the cache, or etcd for finished runs no longer cached).

        Raises:
            NotFound: no such run, or the run has no such task.
        """
        entry = self.cache.runs.get(run_id)
        if entry is not None:
            e = entry.tasks.get(task)
            if e is None:
                raise NotFound(f"task {task!r} not found in run {run_id}")
            out = t.TaskRun()
            out.CopyFrom(self._task_msg(e))
            return out
        if await self.store.get(self.keys.run(run_id)) is None:
            raise NotFound(f"run {run_id!r} not found")
        kv = await self.store.get(self.keys.task(run_id, task))
        if kv is None:
            raise NotFound(f"task {task!r} not found in run {run_id}")
        out = t.TaskRun.FromString(kv.value)
        await restore_depends_on(self.store, [out])
        return out

    async def list_runs(self, size: int, start_id: str | None) -> tuple[list[t.Run], bool]:
        """Up to ``size`` runs, newest first, from ``start_id`` on; and whether more follow."""
        start = self.keys.run(start_id) if start_id is not None else None
        kvs, _ = await self.store.range(
            self.keys.runs, limit=size + 1, start=start, newest_first=True
        )
        runs = []
        for kv in kvs[:size]:
            msg = t.Run.FromString(kv.value)
            cached = self.cache.runs.get(msg.id)
            runs.append(self._run_msg(cached) if cached else msg)
        return runs, len(kvs) > size

    async def watch_run(
        self, run_id: str, from_revision: int, run_only: bool = False
    ) -> AsyncIterator[controller_pb2.RunEvent]:
        """A run's changes: a snapshot then every change (or, from a revision, changes after
        it), ending with the run's final state. ``run_only``: the run's own changes alone (a
        snapshot without tasks, no task events), for callers that wait for the end.

        Raises:
            NotFound: no such run.
        """
        store = self.store
        run_key, task_prefix = self.keys.run(run_id), self.keys.tasks_of(run_id)
        if run_only:
            cached = self.cache.runs.get(run_id)
            if self.run_watch is not None and self.run_watch.can_watch(cached):
                async for ev in self.run_watch.watch(cached, from_revision):
                    yield ev
                return
            # Not cached here: most often finished, which one read tells.
            kv = await store.get(run_key)
            if kv is None:
                raise NotFound(f"run {run_id!r} not found")
            msg = t.Run.FromString(kv.value)
            if msg.state in lc.RUN_TERMINAL:
                if from_revision <= 0:
                    yield controller_pb2.RunEvent(
                        snapshot=msg, run_state=msg.state, revision=kv.mod_revision
                    )
                else:
                    yield controller_pb2.RunEvent(run_state=msg.state, revision=kv.mod_revision)
                return
        seen: dict[str, int] = {}  # task key -> mod_revision last sent
        revision = from_revision
        state = t.RunState.RUN_STATE_UNSPECIFIED
        if revision > 0:
            kv = await store.get(run_key)
            if kv is None:
                raise NotFound(f"run {run_id!r} not found")
            # ``kv`` is also the run as of ``revision`` unless it changed since (a revision
            # ahead of etcd's, which a watch waits for, cannot be read at).
            final = t.Run.FromString(kv.value).state
            if final in lc.RUN_TERMINAL and kv.mod_revision <= revision:
                # Resuming at or after the run's last change: nothing will come; say so.
                yield controller_pb2.RunEvent(run_state=final, revision=kv.mod_revision)
                return
            if not run_only:
                # The run's state as of the resume's revision, restated: the run's own watch
                # may have brought its change after task changes of later revisions (the two
                # watches are not ordered with each other), and a client that resumed after
                # those never saw it. The SDK skips a restatement of what it has seen.
                at: KeyValue | None = kv
                if kv.mod_revision > revision:
                    kvs, _ = await store.range(run_key, limit=1, revision=revision)
                    at = kvs[0] if kvs and kvs[0].key == run_key else None
                if at is not None:
                    state = t.Run.FromString(at.value).state
                    yield controller_pb2.RunEvent(run_state=state, revision=at.mod_revision)
        start = revision + 1 if revision > 0 else 0
        async with _Watches(store, run_key, "" if run_only else task_prefix, start) as w:
            if revision <= 0:
                # Watches from now first, then the snapshot at the revision they start after:
                # a watch from the snapshot's (past) revision would wait for etcd's catch-up.
                revision = await w.created()
                kvs, _ = await store.range(run_key, limit=1, revision=revision)
                if not kvs or kvs[0].key != run_key:
                    raise NotFound(f"run {run_id!r} not found")
                # Built inside the event: a big run's snapshot is not copied there whole.
                event = controller_pb2.RunEvent(revision=revision)
                run = event.snapshot
                run.ParseFromString(kvs[0].value)
                if not run_only:
                    await _add_tasks(store, run, run_id, revision, seen)
                event.run_state = state = run.state
                yield event
                if run.state in lc.RUN_TERMINAL:
                    return
            changes = self._changes(w, run_key, task_prefix, revision, seen, run_only, state)
            async for ev in changes:
                yield ev

    async def _changes(
        self,
        watches: _Watches,
        run_key: str,
        task_prefix: str,
        revision: int,
        seen: dict[str, int],
        run_only: bool = False,
        state: int = t.RunState.RUN_STATE_UNSPECIFIED,
    ) -> AsyncIterator[controller_pb2.RunEvent]:
        """The changes after ``revision``, none sent ahead of a task change of an earlier
        revision (a client resumes after the highest revision it has seen).

        The task watch brings its changes in revision order, a revision's all at once; the
        run's watch is not ordered with it. A run change the task watch has not caught up
        with is held until it has: until it brings a later change, or the changes of the run
        change's revision are all out; if it stays quiet for ``HOLD_SECONDS``, what it has
        not brought up to that revision is read from etcd instead (a task changed twice
        meanwhile then shows its later state only).
        """
        tasks_until = revision  # every task change up to here has come
        held: list[tuple[int, int]] = []  # run changes (state, revision) not yet sent

        def run_event(st: int, rev: int) -> controller_pb2.RunEvent:
            nonlocal state
            state = st
            return controller_pb2.RunEvent(run_state=st, revision=rev)

        while True:
            ev = await watches.next(HOLD_SECONDS if held else None)
            if ev is None:  # the task watch was quiet: read what it has not brought
                until = held[-1][1]
                changed = self._task_changes(task_prefix, tasks_until, until, seen, state)
                async for task_ev in changed:
                    yield task_ev
                tasks_until = until
            elif ev.revision <= revision:
                continue  # already in the snapshot
            elif ev.deleted:
                if ev.key == run_key:
                    continue
                tasks_until = max(tasks_until, ev.revision)  # the task watch got this far
                if watches.task_change_next(ev.revision):
                    continue
            elif ev.key != run_key:
                while held and held[0][1] < ev.revision:
                    yield run_event(*held.pop(0))
                    if state in lc.RUN_TERMINAL:
                        return
                tasks_until = max(tasks_until, ev.revision)
                if seen.get(ev.key, 0) < ev.revision:
                    seen[ev.key] = ev.revision
                    task = t.TaskRun.FromString(ev.value)
                    await restore_depends_on(self.store, [task])
                    yield controller_pb2.RunEvent(task=task, run_state=state, revision=ev.revision)
                if watches.task_change_next(ev.revision):
                    continue  # more of this revision's task changes are queued
            else:
                st = t.Run.FromString(ev.value).state
                if run_only or (not held and tasks_until >= ev.revision):
                    yield run_event(st, ev.revision)
                    if st in lc.RUN_TERMINAL:
                        return
                    continue
                held.append((st, ev.revision))
            while held and held[0][1] <= tasks_until:
                yield run_event(*held.pop(0))
                if state in lc.RUN_TERMINAL:
                    return

    async def _task_changes(
        self, task_prefix: str, after: int, until: int, seen: dict[str, int], state: int
    ) -> AsyncIterator[controller_pb2.RunEvent]:
        """The task records changed after revision ``after``, at or before ``until``, and not
        yet sent (by ``seen``), in revision order."""
        # Only the records changed since: a big run's others would be read for nothing.
        tasks, _ = await self.store.range(task_prefix, revision=until, min_mod_revision=after + 1)
        for kv in sorted(tasks, key=lambda kv: kv.mod_revision):
            if seen.get(kv.key, 0) < kv.mod_revision:
                seen[kv.key] = kv.mod_revision
                task = t.TaskRun.FromString(kv.value)
                await restore_depends_on(self.store, [task], until)
                yield controller_pb2.RunEvent(task=task, run_state=state, revision=kv.mod_revision)


class _Watches:
    """The run key and its task keys (``task_prefix`` "": none) watched together, from
    ``start_revision`` (0: from now).

    Each watch brings its events in revision order, and all of a revision's in one piece
    (queued here without a pause), but the two are not ordered with each other: see
    :meth:`Queries._changes`.
    """

    def __init__(self, store: Store, run_key: str, task_prefix: str, start_revision: int) -> None:
        self.store = store
        self.run_key = run_key
        self.task_prefix = task_prefix
        self.start_revision = start_revision
        self._items: collections.deque[Event | Exception] = collections.deque()
        self._arrived = asyncio.Event()
        self._created: list[asyncio.Future[int]] = []
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> _Watches:
        # Runs and tasks live under different prefixes; watching their common parent would
        # see every run's changes, so watch both.
        loop = asyncio.get_running_loop()
        for prefix in (self.run_key, self.task_prefix) if self.task_prefix else (self.run_key,):
            created: asyncio.Future[int] = loop.create_future()
            self._created.append(created)
            self._tasks.append(asyncio.create_task(self._pump(prefix, created)))
        return self

    async def __aexit__(self, *exc) -> None:
        for tk in self._tasks:
            tk.cancel()
        for tk in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tk

    def _put(self, item: Event | Exception) -> None:
        self._items.append(item)
        self._arrived.set()

    async def _pump(self, prefix: str, created: asyncio.Future[int]) -> None:
        try:
            async for ev in self.store.watch(prefix, self.start_revision, created):
                if prefix == self.run_key and ev.key != self.run_key:
                    continue
                self._put(ev)
        except Exception as e:  # surfaced to the consumer
            if not created.done():
                created.set_exception(e)
            self._put(e)

    async def created(self) -> int:
        """The revision both watches start after (the later of the two)."""
        return max(await asyncio.gather(*self._created))

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event (None when none came within ``timeout`` seconds)."""
        while not self._items:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return None
        item = self._items.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def task_change_next(self, revision: int) -> bool:
        """Whether the next queued event is a task change of ``revision``."""
        head = self._items[0] if self._items else None
        return isinstance(head, Event) and head.key != self.run_key and head.revision == revision
