"""Submitting a run: validation, the idempotent write of run and tasks (split into several
transactions when too big for one), and taking the new run into the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from etcd3aio._protobuf import Compare

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.depends_on import SPLIT_NAMES, part_puts
from tether.controller.errors import AlreadyExists, Conflict, FailedPrecondition, NotLeader
from tether.controller.records import RunEntry, TaskEntry, new_run_id, now
from tether.controller.secrets import Secrets
from tether.controller.store import MAX_TXN_BYTES, MAX_TXN_OPS, Put, Store, mod_revision_is
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.telemetry import get_logger
from tether.sdk.validation import LIMITS, Limits, validate_workflow

__all__ = ["BUILD_SLICE", "CHUNKS_IN_FLIGHT", "Submitter"]

# Transactions of one large submit written at once.
CHUNKS_IN_FLIGHT = 8
# Tasks a large submit builds at a time, writing what it built while it builds the next.
BUILD_SLICE = 5000
# Submits of at most this many tasks are checked and built on the event loop.
INLINE_TASKS = 64
# Pauses between tries to read a run whose submit lost its reply, seconds.
ADOPT_RETRY_FIRST = 0.2
ADOPT_RETRY_MOST = 8.0

log = get_logger("controller.engine")


class Submitter:
    """Writes new runs to etcd and caches them.

    A run whose tasks fit in one transaction of ``txn_bytes`` is written in that one. A bigger
    run is written in several, with its request key as the commit protocol:

    1. the request key is created holding ``<run id> <fingerprint> pending``;
    2. the tasks (and their long ``depends_on`` lists) are written in transactions of at
       most ``txn_bytes`` and :data:`MAX_TXN_OPS` keys, each creating its keys;
    3. the run record is created and the request key set to ``<run id> <fingerprint>`` in
       one transaction that compares the request key's revision: the commit point.

    Until step 3 nothing reads the tasks (runs are found through their records), so no user
    sees half a run. A submit that died on the way is finished by a retry with the same
    request id: it finds the pending key, writes the tasks still missing under the same run
    id, and commits; two submits racing on one request id commit once.

    Args:
        store: The etcd store.
        cache: Where the new run goes once written.
        ensure_loaded: Takes up a run found only in etcd (an earlier submit's lost reply).
        arm_deadline: Starts the run's deadline timer.
        limits: What a submitted spec and its parameters may not exceed.
        secrets: Where the secrets tasks refer to must exist (None: no task may refer to one).
        txn_bytes: Largest transaction (keys and values) a submit writes tasks in.
        binder: Binds a small run's first tasks in its submit transaction (the placer).
    """

    def __init__(
        self,
        store: Store,
        cache: Cache,
        ensure_loaded: Callable[[str], Awaitable[object]],
        arm_deadline: Callable[[RunEntry], None],
        limits: Limits = LIMITS,
        secrets: Secrets | None = None,
        txn_bytes: int = 128 * 1024,
        binder: Binder | None = None,
    ) -> None:
        self.binder = binder
        self._adopting: set[asyncio.Task] = set()
        self._stopped = False
        self.limits = limits
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.ensure_loaded = ensure_loaded
        self.arm_deadline = arm_deadline
        self.secrets = secrets or Secrets(store, None)
        self.txn_bytes = min(txn_bytes, MAX_TXN_BYTES)

    async def submit(
        self,
        spec: t.WorkflowSpec,
        params: dict[str, str],
        request_id: str,
        traceparent: str,
        submitted_by: str = "",
        parent_traceparent: str = "",
    ) -> tuple[str, bool]:
        """Validate and store a new run; return (run id, whether it already existed)."""
        # In threads for a big spec: it takes a while to check and build, and the loop must
        # keep serving heartbeats and leadership meanwhile. A small one is done inline: each
        # hop to a thread costs more than checking a few tasks.
        inline = len(spec.tasks) <= INLINE_TASKS
        await _call(inline, _validate, spec, params, request_id, self.limits)
        await self.secrets.check(spec)
        fingerprint = await _call(inline, _fingerprint, spec, params)
        extra = (submitted_by, parent_traceparent)
        run_id = new_run_id()
        if len(spec.tasks) + 2 <= MAX_TXN_OPS and spec.ByteSize() <= self.txn_bytes:
            new = await _call(
                inline, self._build, spec, params, request_id, traceparent, run_id, extra
            )
            if new.fits(self.txn_bytes):
                done = await self._submit_one(new, request_id, fingerprint)
                if done is not None:
                    return done
                # The request key holds a pending submit of this same run: finish it below.
        if not request_id:
            # The request key carries the commit protocol; a big run gets one either way.
            request_id = f"auto-{run_id}"
        return await self._submit_chunked(
            spec, params, request_id, fingerprint, traceparent, extra, run_id
        )

    async def _submit_one(
        self, new: _NewRun, request_id: str, fingerprint: str
    ) -> tuple[str, bool] | None:
        """Write a small run in one transaction; None: a pending chunked submit holds its
        request id."""
        run = new.run
        bound = self.binder.bind_submitted(run, new.entries) if self.binder else []
        if bound:  # their records are SCHEDULED now, and they do not join the queue
            for e in bound:
                new.items[new.positions[e.msg.index]] = (e.key, e.serialize())
            names = {e.msg.spec.name for e in bound}
            new.ready = [n for n in new.ready if n not in names]
        run_value = run.serialize()
        ops = [Put(k, v) for k, v in new.items] + [Put(run.key, run_value)]
        compares = [mod_revision_is(run.key, 0)]
        try:
            if request_id:
                req_key = self.keys.request(request_id)
                ops.append(Put(req_key, f"{run.msg.id} {fingerprint}".encode()))
                compares.append(mod_revision_is(req_key, 0))
                self._check_open()
                ok, revision, existing = await self.store.txn_get(compares, ops, req_key)
            else:
                self._check_open()
                ok, revision = await self.store.txn(compares, ops)
                existing = None
        except BaseException:
            if bound:
                self.binder.unbind_submitted(bound)
            # Maybe written after all, and then no retry of this request need ever come:
            # take the run up once etcd answers again, as a retry would.
            self._adopt_later(run.msg.id)
            raise
        if ok:
            run.committed = run_value
            self._take_up(new, revision)
            if bound:
                self.binder.submitted(run, bound)
                # One turn of the loop for the agents' stream writers, so that the assignments
                # go out before this handler logs and answers (on an idle mesh they waited
                # ~0.5 ms for that).
                await asyncio.sleep(0)
            log.info("run submitted", run_id=run.msg.id, tasks=len(new.entries))
            return run.msg.id, False
        if bound:
            self.binder.unbind_submitted(bound)
        if existing is None:
            raise FailedPrecondition("run id collision; submit again")
        first, pending = _parse_request(existing, request_id, fingerprint)
        if pending:
            return None
        await self.ensure_loaded(first)
        return first, True

    def _adopt_later(self, run_id: str) -> None:
        """Load ``run_id`` if a submit whose reply was lost did write it."""

        async def adopt() -> None:
            # Until it is read: a run written but never taken up would wait for the next
            # failover, unless its client asked for it again. Ends with the engine (stop).
            delay = ADOPT_RETRY_FIRST
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.ensure_loaded(run_id)
                    return
                except Exception as e:  # etcd still away: try again later
                    log.warning("cannot read a submitted run yet", run_id=run_id, error=str(e))
                delay = min(delay * 2, ADOPT_RETRY_MOST)

        task = asyncio.get_running_loop().create_task(adopt())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def stop(self) -> None:
        """Cancel the adoptions under way, and write nothing more (the engine is stopping)."""
        self._stopped = True
        for task in self._adopting:
            task.cancel()

    def _check_open(self) -> None:
        # Checked right before each write, with no pause in between: the store's fence is
        # the current term's, and a submit of a term that has ended (its handler still
        # running) would otherwise write, and commit, under the next term's.
        if self._stopped:
            raise NotLeader("this controller's leadership term has ended; submit again")

    async def _submit_chunked(
        self,
        spec: t.WorkflowSpec,
        params: dict[str, str],
        request_id: str,
        fingerprint: str,
        traceparent: str,
        extra: tuple[str, str],
        run_id: str,
    ) -> tuple[str, bool]:
        """Write a big run in several transactions (see the class's docstring)."""
        req_key = self.keys.request(request_id)
        marker = f"{run_id} {fingerprint} pending".encode()
        self._check_open()
        ok, marker_rev, existing = await self.store.txn_get(
            [mod_revision_is(req_key, 0)], [Put(req_key, marker)], req_key
        )
        resumed = not ok
        if resumed:
            if existing is None:
                raise Conflict("a submit with this request id was being removed; retry")
            first, pending = _parse_request(existing, request_id, fingerprint)
            if not pending:
                await self.ensure_loaded(first)
                return first, True
            kv = await self.store.get(req_key)
            if kv is None or kv.value != existing:
                raise Conflict("a submit with this request id moved on meanwhile; retry")
            marker_rev = kv.mod_revision
            run_id = first
        new = self._new_run(spec, params, request_id, traceparent, run_id, extra)
        run = new.run
        done = f"{run.msg.id} {fingerprint}".encode()
        revisions = await self._write_pipelined(new, resumed, (req_key, marker_rev, done))
        run_value = run.serialize()
        self._check_open()
        ok, revision = await self.store.txn(
            [mod_revision_is(run.key, 0), mod_revision_is(req_key, marker_rev)],
            [Put(run.key, run_value), Put(req_key, done)],
        )
        if not ok:  # a racing submit with this request id committed the run
            if not await self._committed_meanwhile((req_key, marker_rev, done)):
                raise Conflict("a submit with this request id is under way; retry")
            await self.ensure_loaded(run.msg.id)
            return run.msg.id, True
        if revisions is not None:
            run.committed = run_value
            self._take_up(new, revision, revisions)
            log.info("run submitted", run_id=run.msg.id, tasks=len(new.entries))
        else:
            # The interrupted submit wrote some tasks: their revisions are etcd's to tell.
            await self.ensure_loaded(run.msg.id)
        log.info("large run submitted", run_id=run.msg.id, tasks=len(new.entries), resumed=resumed)
        return run.msg.id, resumed

    def _build(
        self,
        spec: t.WorkflowSpec,
        params: dict[str, str],
        request_id: str,
        traceparent: str,
        run_id: str,
        extra: tuple[str, str],
    ) -> _NewRun:
        """The new run's record and its tasks' records and writes, not yet written."""
        new = self._new_run(spec, params, request_id, traceparent, run_id, extra)
        self._build_tasks(new, 0, len(spec.tasks))
        _link(new)
        return new

    def _new_run(
        self,
        spec: t.WorkflowSpec,
        params: dict[str, str],
        request_id: str,
        traceparent: str,
        run_id: str,
        extra: tuple[str, str],
    ) -> _NewRun:
        """The new run's record, without its tasks yet."""
        created = now()
        run_msg = t.Run(
            id=run_id,
            workflow_name=spec.name,
            state=lc.RUN_PENDING,
            created_at=created,
            task_count=len(spec.tasks),
            request_id=request_id,
            params=params,
            traceparent=traceparent,
            policy=spec.scheduling.policy,
            submitted_by=extra[0],
            parent_traceparent=extra[1],
            run_span=bool(traceparent),
        )
        if spec.HasField("timeout") and spec.timeout.ToNanoseconds() > 0:
            run_msg.deadline.FromNanoseconds(created.ToNanoseconds() + spec.timeout.ToNanoseconds())
        return _NewRun(spec, params, RunEntry(self.keys.run(run_id), run_msg, 0))

    def _build_tasks(self, new: _NewRun, lo: int, hi: int) -> None:
        """Add the entries and writes of tasks ``lo`` to ``hi``, linked to the dependencies
        built before them (:func:`_link` does the rest)."""
        # No more per task than its record, its entry and its keys: this is per-task Python
        # time for 100,000 tasks.
        run_id, traceparent = new.run.msg.id, new.run.msg.traceparent
        entries, items, positions, ready = new.entries, new.items, new.positions, new.ready
        tasks = new.run.tasks
        task_prefix = self.keys.task(run_id, "")
        specs = new.spec.tasks
        for i in range(lo, hi):
            ts = specs[i]
            name = ts.name
            deps = ts.depends_on
            waiting = len(deps)
            msg = t.TaskRun(
                run_id=run_id,
                spec=ts,
                index=i,
                traceparent=traceparent,
                state=lc.PENDING if waiting else lc.READY,
            )
            e = TaskEntry(task_prefix + name, msg, 0, waiting=waiting)
            entries.append(e)
            tasks[name] = e
            positions.append(len(items))
            if waiting > SPLIT_NAMES:
                items.append((e.key, e.serialize()))
                items.extend((p.key, p.value) for p in part_puts(self.keys, msg))
            else:
                items.append((e.key, msg.SerializeToString()))
            if not waiting:
                ready.append(name)
            elif new.deferred or not all(d in tasks for d in deps):
                # A dependency not built yet: this task and all after it are linked at the
                # end, so that each children list stays in task order.
                new.deferred.append(e)
            else:
                for dep in deps:
                    tasks[dep].children.append(name)

    async def _write_pipelined(
        self, new: _NewRun, resumed: bool, pending: _Pending
    ) -> list[int] | None:
        """Build the tasks a slice at a time and write each slice's chunks (transactions of
        :meth:`_chunk_spans`) while the next is built, so that etcd's work and the build
        overlap; then link them. Return the revision each item was written at, or None when
        this call did not create every key (a resumed submit skips what the interrupted one
        wrote). Every chunk requires the ``pending`` marker unchanged."""
        n = len(new.spec.tasks)
        gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)
        spans: list[tuple[int, int]] = []
        writes: list[asyncio.Future[int]] = []

        async def write(a: int, b: int) -> int:
            async with gate:
                return await self._write_chunk(new.items[a:b], resumed, pending)

        # A few in flight: nothing reads them before the commit, so their order is free, and
        # etcd commits concurrent transactions together (one fsync for several).
        try:
            for lo in range(0, n, BUILD_SLICE):
                start = len(new.items)
                await asyncio.to_thread(self._build_tasks, new, lo, min(n, lo + BUILD_SLICE))
                for a, b in self._chunk_spans(new.items, start):
                    spans.append((a, b))
                    writes.append(asyncio.ensure_future(write(a, b)))
                for w in writes:  # a failed write stops the submit before more is built
                    if w.done() and not w.cancelled() and w.exception():
                        raise w.exception()
            await asyncio.to_thread(_link, new)
            results = await asyncio.gather(*writes)
        except BaseException:
            for w in writes:
                w.cancel()
            await asyncio.gather(*writes, return_exceptions=True)
            raise
        return _revisions(spans, results)

    def _chunk_spans(self, items: list[tuple[str, bytes]], start: int = 0) -> list[tuple[int, int]]:
        """``items[start:]`` cut into transactions of at most ``txn_bytes`` and
        :data:`MAX_TXN_OPS` keys, as (first, end) index pairs (a task's keys may span two)."""
        bounds = [start]
        size = 0
        for n in range(start, len(items)):
            key, value = items[n]
            item = len(key) + len(value)
            if n > bounds[-1] and (n - bounds[-1] >= MAX_TXN_OPS or size + item > self.txn_bytes):
                bounds.append(n)
                size = 0
            size += item
        bounds.append(len(items))
        return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]

    async def _write_chunk(
        self, chunk: list[tuple[str, bytes]], resumed: bool, pending: _Pending
    ) -> int:
        """Create the chunk's keys; return the revision, or 0 if some existed already.

        Raises:
            Conflict: The pending marker changed: the submit was deleted as abandoned
                (:mod:`~tether.controller.abandoned_submits`); nothing may be written for it.
        """
        guard = mod_revision_is(pending[0], pending[1])
        self._check_open()
        ok, revision = await self.store.create(chunk, guard)
        if ok:
            return revision
        if await self._committed_meanwhile(pending):
            return 0  # every key is written; the commit finds the run committed
        if not resumed:
            raise FailedPrecondition("run id collision; submit again")
        # Written before the interruption: usually the whole chunk (one check), else in part
        # (chunks were cut elsewhere then): create each key still missing.
        exists = [
            Compare(
                key=key.encode(),
                target=Compare.CompareTarget.MOD,
                result=Compare.CompareResult.GREATER,
                mod_revision=0,
            )
            for key, _ in chunk
        ]
        self._check_open()
        if (await self.store.txn(exists, []))[0]:
            return 0
        for item in chunk:
            self._check_open()
            if not (await self.store.create([item], guard))[0]:
                if await self._committed_meanwhile(pending):
                    return 0
        return 0

    async def _committed_meanwhile(self, pending: _Pending) -> bool:
        """Whether a racing submit of the same request committed the run (False: the pending
        marker is still there, unchanged).

        Raises:
            Conflict: The marker is gone or replaced: the submit was deleted as abandoned.
        """
        key, revision, done = pending
        kv = await self.store.get(key)
        if kv is not None and kv.value == done:
            return True
        if kv is None or kv.mod_revision != revision:
            raise Conflict(
                "this submit stayed pending past the controller's pending_submit_ttl (counted "
                "from its first try) and its tasks were deleted; submit again"
            )
        return False

    def _take_up(self, new: _NewRun, revision: int, revisions: list[int] | None = None) -> None:
        """Cache the run just written (``revisions``: of its items, written before it) and
        queue its tasks that can start."""
        run = new.run
        run.rev = revision
        items = new.items
        if revisions:
            for e, pos in zip(new.entries, new.positions, strict=True):
                e.rev = revisions[pos]
                e.committed = items[pos][1]
        else:
            for e, pos in zip(new.entries, new.positions, strict=True):
                e.rev = revision
                e.committed = items[pos][1]
        self.cache.runs[run.msg.id] = run
        self.arm_deadline(run)
        for name in new.ready:
            self.cache.enqueue((run.msg.id, name))
        self.cache.kick()


# A large submit's request key, the revision of its pending marker, and the value its commit
# writes there.
_Pending = tuple[str, int, bytes]


@dataclass
class _NewRun:
    """A run built from a submitted spec (its record holding its task entries, linked to
    their children once all are built), with its tasks' etcd writes as (key, value) items."""

    spec: t.WorkflowSpec
    params: dict[str, str]
    run: RunEntry
    entries: list[TaskEntry] = field(default_factory=list)
    items: list[tuple[str, bytes]] = field(default_factory=list)
    # Where each entry's own record is in ``items``.
    positions: list[int] = field(default_factory=list)
    # The tasks that can start at once.
    ready: list[str] = field(default_factory=list)
    # Built tasks not yet linked to their dependencies (see _build_tasks).
    deferred: list[TaskEntry] = field(default_factory=list)

    def fits(self, txn_bytes: int) -> bool:
        """Whether the run and its tasks fit in one transaction (with a request key)."""
        if len(self.items) + 2 > MAX_TXN_OPS:
            return False
        size = sum(len(k) + len(v) for k, v in self.items)
        return size + len(self.run.key) + self.run.msg.ByteSize() + 200 <= txn_bytes


class Binder(Protocol):
    """Places a run's first tasks as it is submitted (:class:`~tether.controller.placement.
    Placer`)."""

    def bind_submitted(self, run: RunEntry, entries: list[TaskEntry]) -> list[TaskEntry]: ...

    def unbind_submitted(self, entries: list[TaskEntry]) -> None: ...

    def submitted(self, run: RunEntry, entries: list[TaskEntry]) -> None: ...


async def _call(inline: bool, fn, *args):
    return fn(*args) if inline else await asyncio.to_thread(fn, *args)


def _link(new: _NewRun) -> None:
    """Give the tasks whose links were deferred their children, and the run its count of
    unfinished tasks."""
    tasks = new.run.tasks
    for e in new.deferred:
        name = e.msg.spec.name
        for dep in e.msg.spec.depends_on:
            tasks[dep].children.append(name)
    new.deferred.clear()
    new.run.unfinished = len(new.entries)


def _revisions(spans: list[tuple[int, int]], results: list[int]) -> list[int] | None:
    """Each item's revision from its chunk's (None if some chunk created no keys)."""
    if not all(results):
        return None
    revisions: list[int] = []
    for (a, b), rev in zip(spans, results, strict=True):
        revisions.extend([rev] * (b - a))
    return revisions


def _parse_request(record: bytes, request_id: str, fingerprint: str) -> tuple[str, bool]:
    """The run id a request key holds, and whether its submit is still pending.

    Raises:
        AlreadyExists: The earlier submit had another workflow or other params: returning
            its run would tell the caller that their submit was done when it was not.
    """
    run_id, _, rest = record.decode().partition(" ")
    stored, _, state = rest.partition(" ")
    if stored and stored != fingerprint:
        raise AlreadyExists(
            f"request_id {request_id[:64]!r} belongs to run {run_id}, submitted with a "
            "different workflow or params; use a new request id for a new run"
        )
    return run_id, state == "pending"


def _fingerprint(spec: t.WorkflowSpec, params: dict[str, str]) -> str:
    """A digest of what was submitted, to tell a retry from another submit reusing its id."""
    h = hashlib.sha256(spec.SerializeToString(deterministic=True))
    for k in sorted(params):
        h.update(b"\0" + k.encode() + b"\0" + params[k].encode())
    return h.hexdigest()[:32]


def _validate(
    spec: t.WorkflowSpec, params: dict[str, str], request_id: str, limits: Limits
) -> None:
    # The request's own fields first: they are cheap, and a huge one must not be echoed.
    _validate_request(request_id, params, limits)
    validate_workflow(spec, limits, params=params)


def _validate_request(request_id: str, params: dict[str, str], limits: Limits) -> None:
    problems = []
    if len(request_id) > limits.max_id_length or any(not c.isprintable() for c in request_id):
        problems.append(
            FieldViolation(
                "request_id",
                f"at most {limits.max_id_length} printable characters (limit max_id_length)",
            )
        )
    total = 0
    for k, v in params.items():
        size = len(v.encode())
        total += len(k.encode()) + size
        if not k or len(k) > 128:
            problems.append(FieldViolation(f"params.{k}", "keys must be 1-128 characters"))
        if size > limits.max_param_value_bytes:
            problems.append(
                FieldViolation(
                    f"params.{k}",
                    f"value is {size} bytes; at most {limits.max_param_value_bytes} "
                    "(limit max_param_value_bytes)",
                )
            )
    if total > limits.max_params_bytes:
        problems.append(
            FieldViolation(
                "params",
                f"{total} bytes in all; at most {limits.max_params_bytes} (limit max_params_bytes)",
            )
        )
    if problems:
        raise InvalidSpecError(problems)
