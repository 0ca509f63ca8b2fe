"""Submitting a run: validation, the idempotent write of run and tasks (split into several
transactions when too big for one), and taking the new run into the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.errors import AlreadyExists, FailedPrecondition
from tether.controller.records import RunEntry, TaskEntry, new_run_id, now
from tether.controller.secrets import Secrets
from tether.controller.store import MAX_TXN_BYTES, MAX_TXN_OPS, Put, Store, mod_revision_is
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.telemetry import get_logger
from tether.sdk.validation import LIMITS, Limits, validate_params, validate_workflow

__all__ = ["Submitter"]

log = get_logger("controller.engine")


class Submitter:
    """Writes new runs to etcd and caches them.

    Args:
        store: The etcd store.
        cache: Where the new run goes once written.
        ensure_loaded: Takes up a run found only in etcd (an earlier submit's lost reply).
        arm_deadline: Starts the run's deadline timer.
        limits: What a submitted spec and its parameters may not exceed.
        secrets: Where the secrets tasks refer to must exist (None: no task may refer to one).
    """

    def __init__(
        self,
        store: Store,
        cache: Cache,
        ensure_loaded: Callable[[str], Awaitable[object]],
        arm_deadline: Callable[[RunEntry], None],
        limits: Limits = LIMITS,
        secrets: Secrets | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.ensure_loaded = ensure_loaded
        self.arm_deadline = arm_deadline
        self.secrets = secrets or Secrets(store, None)

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
        # In a thread: a big spec takes a while to check, and the loop must keep serving
        # heartbeats and leadership meanwhile.
        await asyncio.to_thread(_validate, spec, params, request_id, self.limits)
        await self.secrets.check(spec)
        run, entries = self._build(spec, params, request_id, traceparent)
        run.msg.submitted_by = submitted_by
        run.msg.parent_traceparent = parent_traceparent
        run.msg.run_span = bool(traceparent)
        run_id = run.msg.id
        puts = [Put(e.key, e.serialize()) for e in entries]
        req_key = self.keys.request(request_id) if request_id else ""
        final = [Put(run.key, run.serialize())]
        compares = [mod_revision_is(run.key, 0)]
        fingerprint = _fingerprint(spec, params)
        if req_key:
            final.append(Put(req_key, f"{run_id} {fingerprint}".encode()))
            compares.append(mod_revision_is(req_key, 0))
        size = sum(len(p.value) + len(p.key) for p in puts + final)
        if len(puts) + len(final) <= MAX_TXN_OPS and size <= MAX_TXN_BYTES:
            ops = puts + final
        else:
            # Too big for one transaction: write the tasks first, then the run record, which
            # is the commit point. Tasks without a run record are never loaded; they are deleted
            # when the run record loses a race, and left behind (unread, under a run id nobody
            # has) only if the controller dies between the two steps.
            if req_key:
                existing = await self.store.get(req_key)
                if existing:
                    return await self._existing(existing.value, request_id, fingerprint), True
            await self._write_chunks(entries, puts)
            ops = final
        if req_key:
            ok, revision, existing = await self.store.txn_get(compares, ops, req_key)
        else:
            ok, revision = await self.store.txn(compares, ops)
            existing = None
        if not ok:
            if len(ops) == len(final) and len(puts):
                await self.store.delete_prefix(self.keys.tasks_of(run_id))
            if existing is not None:
                return await self._existing(existing, request_id, fingerprint), True
            raise FailedPrecondition("run id collision; submit again")
        self._take_up(run, entries, revision)
        log.info("run submitted", run_id=run_id, workflow=spec.name, tasks=len(entries))
        return run_id, False

    def _build(
        self, spec: t.WorkflowSpec, params: dict[str, str], request_id: str, traceparent: str
    ) -> tuple[RunEntry, list[TaskEntry]]:
        """The new run's record and its tasks' records, not yet written."""
        run_id = new_run_id()
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
        )
        if spec.HasField("timeout") and spec.timeout.ToNanoseconds() > 0:
            run_msg.deadline.FromNanoseconds(created.ToNanoseconds() + spec.timeout.ToNanoseconds())
        entries: list[TaskEntry] = []
        for i, ts in enumerate(spec.tasks):
            msg = t.TaskRun(
                run_id=run_id,
                spec=ts,
                index=i,
                traceparent=traceparent,
                state=lc.PENDING if ts.depends_on else lc.READY,
            )
            entries.append(
                TaskEntry(self.keys.task(run_id, ts.name), msg, 0, waiting=len(ts.depends_on))
            )
        return RunEntry(self.keys.run(run_id), run_msg, 0), entries

    async def _write_chunks(self, entries: list[TaskEntry], puts: list[Put]) -> None:
        chunk: list[TaskEntry] = []
        chunk_size = 0
        for e, p in zip(entries, puts, strict=True):
            if chunk and (len(chunk) >= MAX_TXN_OPS or chunk_size + len(p.value) > MAX_TXN_BYTES):
                await self._write_chunk(chunk)
                chunk, chunk_size = [], 0
            chunk.append(e)
            chunk_size += len(p.value) + len(p.key)
        if chunk:
            await self._write_chunk(chunk)

    async def _write_chunk(self, chunk: list[TaskEntry]) -> None:
        _, revision = await self.store.txn(
            [mod_revision_is(e.key, 0) for e in chunk], [Put(e.key, e.serialize()) for e in chunk]
        )
        for e in chunk:
            e.rev = revision

    def _take_up(self, run: RunEntry, entries: list[TaskEntry], revision: int) -> None:
        """Cache the run just written and queue its tasks that can start."""
        run.rev = revision
        for e in entries:
            e.rev = e.rev or revision
            run.tasks[e.msg.spec.name] = e
            run.unfinished += 1
        for e in entries:
            for dep in e.msg.spec.depends_on:
                run.tasks[dep].children.append(e.msg.spec.name)
        self.cache.runs[run.msg.id] = run
        self.arm_deadline(run)
        for e in entries:
            if e.msg.state == lc.READY:
                self.cache.enqueue((run.msg.id, e.msg.spec.name))
        self.cache.kick()

    async def _existing(self, record: bytes, request_id: str, fingerprint: str) -> str:
        """The run an earlier submit with the same request id created. If that submit's reply
        was lost after etcd applied it, the run is in etcd but not here yet: take it up.

        Raises:
            AlreadyExists: The earlier submit had another workflow or other params: returning
                its run would tell the caller that their submit was done when it was not.
        """
        run_id, _, stored = record.decode().partition(" ")
        if stored and stored != fingerprint:
            raise AlreadyExists(
                f"request_id {request_id[:64]!r} belongs to run {run_id}, submitted with a "
                "different workflow or params; use a new request id for a new run"
            )
        await self.ensure_loaded(run_id)
        return run_id


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
    validate_workflow(spec, limits)
    validate_params(spec, params)


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
