"""Batches the engine's record writes into etcd transactions.

Each record the engine changes is marked dirty; one writer loop turns all dirty records into
as few transactions as etcd allows, each guarded by the records' ``mod_revision`` (so a
concurrent writer is detected, never overwritten). Callbacks such as "send the assignment"
or "acknowledge the report" run only after their write committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from etcd3aio import EtcdError

from tether.controller.errors import NotLeader
from tether.controller.store import MAX_TXN_BYTES, MAX_TXN_OPS, Put, Store, mod_revision_is
from tether.sdk.telemetry import get_logger

log = get_logger("controller.committer")


class Record(Protocol):
    key: str
    rev: int
    committed: bytes

    def serialize(self) -> bytes: ...


@dataclass
class _Dirty:
    record: Record
    callbacks: list[Callable[[], None]] = field(default_factory=list)


class Committer:
    """Writes dirty records in batched, compare-guarded transactions.

    Args:
        store: The etcd store.
        on_conflict: Called with the records of a transaction whose compare failed; the
            engine reloads them from etcd.
        on_not_leader: Called when etcd refused a write because this controller no longer
            leads; nothing more is written.
        on_written: Called with each record and the value it was committed with (before its
            callbacks).
    """

    def __init__(
        self,
        store: Store,
        on_conflict: Callable[[list[Record]], None],
        on_not_leader: Callable[[], None] = lambda: None,
        on_written: Callable[[Record, bytes], None] = lambda record, value: None,
    ) -> None:
        self._store = store
        self._on_written = on_written
        self._on_conflict = on_conflict
        self._on_not_leader = on_not_leader
        self._dirty: dict[str, _Dirty] = {}
        # The batch being written right now, by key.
        self._inflight: dict[str, _Dirty] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        # Set once etcd refused a write (deposed) or the engine stops: nothing more is
        # written, and no callback runs, since none of them would be backed by etcd.
        self._closed = False
        # Futures of callers waiting in written(): failed when closed.
        self._waiters: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="committer")

    async def stop(self) -> None:
        self._close()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def mark(self, record: Record, callback: Callable[[], None] | None = None) -> None:
        """Schedule ``record`` to be written; run ``callback`` once it is committed."""
        if self._closed:
            return
        d = self._dirty.get(record.key)
        if d is None:
            d = self._dirty[record.key] = _Dirty(record)
        else:
            d.record = record
        if callback:
            d.callbacks.append(callback)
        self._idle.clear()
        self._wake.set()

    def when_written(self, record: Record, callback: Callable[[], None]) -> None:
        """Run ``callback`` once ``record``'s current state is in etcd (now, if it is).

        Never, once closed: a deposed engine's records may hold what it could not write
        (an acknowledgement then would have an agent forget a result that is nowhere).
        """
        if self._closed:
            return
        d = self._dirty.get(record.key) or self._inflight.get(record.key)
        if d is None:
            callback()
        else:
            d.callbacks.append(callback)

    async def written(self, records: Iterable[Record]) -> None:
        """Wait until the current state of each of ``records`` is in etcd.

        Raises:
            NotLeader: closed (deposed or stopping) before that: it may never be written.
        """
        loop = asyncio.get_running_loop()
        waiting = []
        for record in records:
            fut: asyncio.Future[None] = loop.create_future()
            self.when_written(record, lambda f=fut: f.done() or f.set_result(None))
            waiting.append(fut)
        if self._closed:
            raise NotLeader("this controller is no longer the leader")
        waiting = [f for f in waiting if not f.done()]
        if not waiting:
            return
        self._waiters.update(waiting)
        try:
            await asyncio.gather(*waiting)
        finally:
            self._waiters.difference_update(waiting)

    def _close(self) -> None:
        self._closed = True
        self._dirty.clear()
        self._idle.set()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(NotLeader("this controller is no longer the leader"))

    def forget(self, keys: Callable[[str], bool]) -> None:
        """Drop queued writes (and their callbacks) of the keys ``keys`` selects: the engine is
        rebuilding those records from etcd."""
        for key in [k for k in self._dirty if keys(k)]:
            del self._dirty[key]

    async def flushed(self) -> None:
        """Wait until everything marked so far is written."""
        await self._idle.wait()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch = self._take_batch()
                try:
                    await self._write(batch)
                    backoff = 0.05
                except NotLeader:
                    # A deposed leader must not write: drop everything; the new leader
                    # rebuilds its state from etcd.
                    log.warning("write refused: no longer the leader", records=len(batch))
                    self._close()
                    self._inflight.clear()
                    self._on_not_leader()
                    return
                except (EtcdError, TimeoutError, OSError) as e:
                    log.warning("etcd write failed; retrying", error=str(e), records=len(batch))
                    await self._after_unclear_failure(batch)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                finally:
                    self._inflight.clear()
            if not self._dirty:
                self._idle.set()

    async def _after_unclear_failure(self, batch: list[tuple[_Dirty, bytes]]) -> None:
        """A transaction failed without a clear answer: it may have been applied. Records
        whose key now holds exactly what we wrote are committed; the rest go back in line."""
        retry = []
        for d, value in batch:
            try:
                kv = await self._store.get(d.record.key)
            except Exception:  # etcd still unreachable: try the whole batch again later
                kv = None
            if kv is not None and kv.value == value and kv.mod_revision > d.record.rev:
                d.record.rev = kv.mod_revision
                self._committed(d, value)
            else:
                retry.append(d)
        for d in retry:  # put back, unless re-marked meanwhile (newer wins)
            cur = self._dirty.get(d.record.key)
            if cur is None:
                self._dirty[d.record.key] = d
            else:
                cur.callbacks[:0] = d.callbacks

    def _take_batch(self) -> list[tuple[_Dirty, bytes]]:
        # Serialize now: a record changed while the txn is in flight is re-marked dirty and
        # written by the next batch, compared against the revision this one produces.
        batch: list[tuple[_Dirty, bytes]] = []
        size = 0
        for key in list(self._dirty):
            d = self._dirty[key]
            value = d.record.serialize()
            if batch and (len(batch) >= MAX_TXN_OPS or size + len(value) > MAX_TXN_BYTES):
                break
            size += len(value) + len(key)
            batch.append((d, value))
            del self._dirty[key]
            self._inflight[key] = d
        return batch

    async def _write(self, batch: list[tuple[_Dirty, bytes]]) -> None:
        compares = [mod_revision_is(d.record.key, d.record.rev) for d, _ in batch]
        puts = [Put(d.record.key, value) for d, value in batch]
        ok, revision = await self._store.txn(compares, puts)
        if not ok:
            keys = [d.record.key for d, _ in batch]
            log.warning("write conflict; reloading records", keys=keys[:5])
            self._on_conflict([d.record for d, _ in batch])
            return
        for d, _ in batch:
            d.record.rev = revision
        for d, value in batch:
            self._committed(d, value)

    def pending(self, key: str) -> bool:
        """Whether a change of ``key``'s record is not in etcd yet (queued or being written)."""
        return key in self._dirty or key in self._inflight

    def _committed(self, d: _Dirty, value: bytes) -> None:
        d.record.committed = value
        try:
            self._on_written(d.record, value)
        except Exception:  # a hook bug must not stop all writes
            log.exception("commit hook failed", key=d.record.key)
        for cb in d.callbacks:
            try:
                cb()
            except Exception:  # a callback bug must not stop all writes
                log.exception("commit callback failed", key=d.record.key)
        d.callbacks.clear()
