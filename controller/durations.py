"""Learned task durations per (workflow name, task name), kept small in etcd, for the
critical-path policy.

One record per workflow name (``<prefix>/durations/<name>``, a ``LearnedDurations``) holds a
moving average of each task's successful attempts, at most :data:`MAX_TASKS` entries. It is
read when a run of that workflow is first placed and written (one transaction) a moment after
its tasks succeed, so a run of thousands of tasks costs a handful of writes.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import NotLeader
from tether.controller.store import Put, Store
from tether.sdk.telemetry import get_logger

__all__ = ["MAX_TASKS", "Durations"]

log = get_logger("controller.engine")

MAX_TASKS = 1000
# Weight of the newest observation in the moving average.
_ALPHA = 0.5
# Seconds to wait for more observations before writing a workflow's record.
_WRITE_DELAY = 1.0


class Durations:
    """What this controller knows of how long tasks take, by workflow name and task name.

    Args:
        store: The etcd store.
        on_loaded: Called with a workflow name once its record has been read.
    """

    def __init__(self, store: Store, on_loaded: Callable[[str], None] = lambda _: None) -> None:
        self.store = store
        self.on_loaded = on_loaded
        self.known: dict[str, dict[str, float]] = {}
        self._loading: set[str] = set()
        # Workflows with observations not written yet -> the timer that writes them.
        self._dirty: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()  # reads and writes in flight
        self._writes: set[asyncio.Task] = set()  # the writes among them
        # Set by close(): nothing more is read or written (the store is about to close).
        self._closed = False

    def key(self, workflow: str) -> str:
        return f"{self.store.keys.prefix}/durations/{urllib.parse.quote(workflow, safe='')}"

    def of(self, workflow: str) -> dict[str, float]:
        """The learned durations of ``workflow``'s tasks (empty until read from etcd; the
        read starts here)."""
        got = self.known.get(workflow)
        if got is None:
            if workflow not in self._loading:
                self._loading.add(workflow)
                self._spawn(self._load(workflow))
            return {}
        return got

    def observe(self, workflow: str, task: str, seconds: float) -> None:
        """A task of ``workflow`` succeeded after ``seconds``."""
        if seconds <= 0:
            return
        table = self.known.setdefault(workflow, {})
        old = table.get(task)
        table[task] = seconds if old is None else _ALPHA * seconds + (1 - _ALPHA) * old
        if len(table) > MAX_TASKS:
            table.pop(next(iter(table)))  # the oldest entry goes first
        if workflow not in self._dirty and not self._closed:
            self._dirty[workflow] = asyncio.get_running_loop().call_later(
                _WRITE_DELAY, lambda: self._spawn(self._write(workflow), write=True)
            )

    def _spawn(self, coro, write: bool = False) -> None:
        if self._closed:
            coro.close()
            return
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a unit test): nothing to persist with
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if write:
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _load(self, workflow: str) -> None:
        try:
            kv = await self.store.get(self.key(workflow))
        except Exception as e:  # placement goes on with declared durations only
            log.warning("could not read learned durations", workflow=workflow, error=str(e))
            self._loading.discard(workflow)
            return
        stored = dict(t.LearnedDurations.FromString(kv.value).seconds) if kv else {}
        # Observations made while the read was on its way win over the stored ones.
        self.known[workflow] = {**stored, **self.known.get(workflow, {})}
        self._loading.discard(workflow)
        self.on_loaded(workflow)

    async def _write(self, workflow: str) -> None:
        self._dirty.pop(workflow, None)
        msg = t.LearnedDurations(seconds=self.known.get(workflow, {}))
        try:
            await self.store.txn([], [Put(self.key(workflow), msg.SerializeToString())])
        except NotLeader:  # the new leader learns them again from the next run
            log.info("learned durations not written: no longer the leader", workflow=workflow)
        except Exception as e:  # learned again by the next run
            log.warning("could not write learned durations", workflow=workflow, error=str(e))

    async def close(self, timeout: float = 1.0) -> None:
        """Write what is not written yet and finish the writes in flight (for up to
        ``timeout`` seconds together), then cancel the rest: nothing is read or written
        after this returns, and observations made meanwhile are not kept."""
        self._closed = True
        dirty = list(self._dirty)
        for handle in self._dirty.values():
            handle.cancel()
        self._dirty.clear()
        pending = [*self._writes, *(asyncio.ensure_future(self._write(w)) for w in dirty)]
        try:
            if pending:
                _, late = await asyncio.wait(pending, timeout=timeout)
                if late:
                    log.warning("learned durations not written at shutdown", workflows=len(late))
        finally:
            for task in (*self._tasks, *pending):
                task.cancel()
