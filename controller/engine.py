"""The workflow engine: the controller's cache of runs, tasks and nodes, and every rule that
moves them.

etcd is the source of truth. The engine loads unfinished runs at start, keeps them in memory,
and changes them only through the lifecycle tables, persisting each change with the
:class:`Committer` (compare-and-swap on ``mod_revision``). Side effects that reach agents
(assignments, cancellations, acknowledgements) happen only after the change is committed, so a
controller that dies mid-way leaves etcd in a state the next one resumes from.

Everything here runs on one asyncio loop; methods that are not ``async`` never block.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from google.protobuf import duration_pb2, timestamp_pb2
from opentelemetry import trace

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.committer import Committer
from tether.controller.config import ControllerConfig
from tether.controller.errors import FailedPrecondition, NotFound, OutOfRange
from tether.controller.metrics import Metrics
from tether.controller.records import AgentSession, RunEntry, TaskEntry, new_run_id, now
from tether.controller.retry import retry_delay
from tether.controller.scheduler import NodeState, first_fit, never_fits
from tether.controller.store import (
    MAX_TXN_BYTES,
    MAX_TXN_OPS,
    Delete,
    Put,
    Store,
    mod_revision_is,
)
from tether.sdk.errors import InvalidSpecError
from tether.sdk.telemetry import context_from_traceparent, get_logger, traceparent_of
from tether.sdk.templating import TemplateError, render_spec
from tether.sdk.validation import validate_params, validate_workflow

__all__ = ["Engine"]

log = get_logger("controller.engine")

_FINAL_REPORTS = {lc.SUCCEEDED, lc.FAILED, lc.CANCELLED}
_MAX_OUTPUT = 64 * 1024
_MAX_EVENTS = 50


class Engine:
    """Runs workflows: submit, reconcile, schedule, record results, cancel.

    Args:
        config: The controller's configuration.
        store: The etcd store.
        tracer: Tracer for scheduling and dispatch spans.
        on_not_leader: Called when a write is refused because this controller no longer
            leads; the server then stops this engine.
        metrics: Where counters and latencies are recorded.
    """

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        tracer: trace.Tracer,
        on_not_leader: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._ready_since: dict[tuple[str, str], float] = {}
        self.store = store
        self.keys = store.keys
        self.tracer = tracer
        self.runs: dict[str, RunEntry] = {}
        self.nodes: dict[str, NodeState] = {}
        self.ready: dict[tuple[str, str], None] = {}
        self.committer = Committer(store, self._on_conflict, on_not_leader)
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._reloading: set[str] = set()
        self._loading: dict[str, asyncio.Future] = {}
        # Run deadlines and the orphan check: cancelled when the engine stops.
        self._other_timers: list[asyncio.TimerHandle] = []
        self.started = time.monotonic()

    # Start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished runs and known nodes from etcd, then start the loops."""
        runs, revision = await self.store.range(self.keys.runs)
        for kv in runs:
            msg = t.Run.FromString(kv.value)
            if msg.state in lc.RUN_TERMINAL:
                continue
            await self._load_run(msg, kv.mod_revision)
        nodes, _ = await self.store.range(self.keys.nodes, revision=revision)
        for kv in nodes:
            node = t.Node.FromString(kv.value)
            st = self._node(node.name)
            st.lease_id = kv.lease
        self.committer.start()
        self._tasks.append(asyncio.create_task(self._schedule_loop(), name="scheduler"))
        self._tasks.append(asyncio.create_task(self._watch_nodes(revision + 1), name="node-watch"))
        if self.config.retention > 0:
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        # Attempts bound to nodes that are gone get a lease TTL to re-register before they are
        # declared lost: an agent may be reconnecting to this controller right now.
        registered = {kv.key.rsplit("/", 1)[1] for kv in nodes}
        orphans = {
            (r.msg.id, e.msg.spec.name)
            for r in self.runs.values()
            for e in r.tasks.values()
            if e.msg.state in lc.TASK_ACTIVE and e.msg.node not in registered
        }
        if orphans:
            self._other_timers.append(
                asyncio.get_running_loop().call_later(
                    self.config.lease_ttl, self._expire_orphans, orphans
                )
            )
        for run in list(self.runs.values()):
            self._reconcile_run(run)
        self._kick.set()
        log.info("engine started", runs=len(self.runs), nodes=len(nodes), revision=revision)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.committer.stop()
        for h in [*self._timers.values(), *self._other_timers]:
            h.cancel()
        for node in self.nodes.values():
            if node.session:
                node.session.close()

    async def _load_run(self, msg: t.Run, rev: int) -> RunEntry:
        tasks, _ = await self.store.range(self.keys.tasks_of(msg.id))
        run = RunEntry(self.keys.run(msg.id), msg, rev)
        for kv in tasks:
            tm = t.TaskRun.FromString(kv.value)
            run.tasks[tm.spec.name] = TaskEntry(kv.key, tm, kv.mod_revision)
        for e in run.tasks.values():
            for dep in e.msg.spec.depends_on:
                if dep in run.tasks:
                    run.tasks[dep].children.append(e.msg.spec.name)
            if e.msg.state not in lc.TASK_TERMINAL:
                run.unfinished += 1
            if e.msg.state in lc.TASK_ACTIVE:
                self._account(e, +1)
        self.runs[msg.id] = run
        return run

    # Submit -----------------------------------------------------------------------------------

    async def submit(
        self, spec: t.WorkflowSpec, params: dict[str, str], request_id: str, traceparent: str
    ) -> tuple[str, bool]:
        """Validate and store a new run; return (run id, whether it already existed)."""
        validate_workflow(spec)
        validate_params(spec, params)
        _validate_request(request_id, params)
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
        run = RunEntry(self.keys.run(run_id), run_msg, 0)
        puts = [Put(e.key, e.serialize()) for e in entries]
        run_put = Put(run.key, run.serialize())
        req_key = self.keys.request(request_id) if request_id else ""
        final = [run_put] + ([Put(req_key, run_id.encode())] if req_key else [])
        compares = [mod_revision_is(run.key, 0)]
        if req_key:
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
                    return await self._existing(existing.value.decode()), True
            chunk: list[TaskEntry] = []
            chunk_size = 0
            for e, p in zip(entries, puts, strict=True):
                if chunk and (
                    len(chunk) >= MAX_TXN_OPS or chunk_size + len(p.value) > MAX_TXN_BYTES
                ):
                    await self._write_chunk(chunk)
                    chunk, chunk_size = [], 0
                chunk.append(e)
                chunk_size += len(p.value) + len(p.key)
            if chunk:
                await self._write_chunk(chunk)
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
                return await self._existing(existing.decode()), True
            raise FailedPrecondition("run id collision; submit again")
        run.rev = revision
        for e in entries:
            e.rev = e.rev or revision
            run.tasks[e.msg.spec.name] = e
            run.unfinished += 1
        for e in entries:
            for dep in e.msg.spec.depends_on:
                run.tasks[dep].children.append(e.msg.spec.name)
        self.runs[run_id] = run
        self._arm_deadline(run)
        for e in entries:
            if e.msg.state == lc.READY:
                self._enqueue((run_id, e.msg.spec.name))
        self._kick.set()
        log.info("run submitted", run_id=run_id, workflow=spec.name, tasks=len(entries))
        return run_id, False

    async def _existing(self, run_id: str) -> str:
        """The run an earlier submit with the same request id created. If that submit's reply
        was lost after etcd applied it, the run is in etcd but not here yet: take it up."""
        await self.ensure_loaded(run_id)
        return run_id

    async def ensure_loaded(self, run_id: str) -> RunEntry | None:
        """The cached run; an unfinished run found only in etcd is loaded and reconciled."""
        if run_id in self.runs:
            return self.runs[run_id]
        if run_id in self._loading:  # one load per run, however many callers ask
            return await asyncio.shield(self._loading[run_id])
        fut = self._loading[run_id] = asyncio.get_running_loop().create_future()
        try:
            run = None
            kv = await self.store.get(self.keys.run(run_id))
            if kv is not None and run_id not in self.runs:
                msg = t.Run.FromString(kv.value)
                if msg.state not in lc.RUN_TERMINAL:
                    run = await self._load_run(msg, kv.mod_revision)
                    self._reconcile_run(run)
                    self._kick.set()
            run = self.runs.get(run_id, run)
            fut.set_result(run)
            return run
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: later waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[run_id]

    async def _write_chunk(self, chunk: list[TaskEntry]) -> None:
        _, revision = await self.store.txn(
            [mod_revision_is(e.key, 0) for e in chunk], [Put(e.key, e.serialize()) for e in chunk]
        )
        for e in chunk:
            e.rev = revision

    # Reads ------------------------------------------------------------------------------------

    async def get_run(self, run_id: str, with_tasks: bool = True) -> t.Run:
        """Return a run (from the cache, or etcd for finished runs no longer cached)."""
        entry = self.runs.get(run_id)
        if entry is not None:
            out = t.Run()
            out.CopyFrom(entry.msg)
            if with_tasks:
                out.tasks.extend(
                    sorted((e.msg for e in entry.tasks.values()), key=lambda m: m.index)
                )
            return out
        kv = await self.store.get(self.keys.run(run_id))
        if kv is None:
            raise NotFound(f"run {run_id!r} not found")
        out = t.Run.FromString(kv.value)
        if with_tasks:
            tasks, _ = await self.store.range(self.keys.tasks_of(run_id))
            out.tasks.extend(
                sorted((t.TaskRun.FromString(x.value) for x in tasks), key=lambda m: m.index)
            )
        return out

    async def get_task(self, run_id: str, task: str) -> t.TaskRun:
        """Return one task of a run (from the cache, or etcd for finished runs no longer cached).

        Raises:
            NotFound: no such run, or the run has no such task.
        """
        entry = self.runs.get(run_id)
        if entry is not None:
            e = entry.tasks.get(task)
            if e is None:
                raise NotFound(f"task {task!r} not found in run {run_id}")
            out = t.TaskRun()
            out.CopyFrom(e.msg)
            return out
        if await self.store.get(self.keys.run(run_id)) is None:
            raise NotFound(f"run {run_id!r} not found")
        kv = await self.store.get(self.keys.task(run_id, task))
        if kv is None:
            raise NotFound(f"task {task!r} not found in run {run_id}")
        return t.TaskRun.FromString(kv.value)

    def session_of(self, node: str) -> AgentSession | None:
        """The open stream of a node's agent, or None when the node is not connected here."""
        st = self.nodes.get(node)
        if st is None or st.session is None or st.session.closed:
            return None
        return st.session

    async def list_nodes(self) -> list[t.Node]:
        kvs, _ = await self.store.range(self.keys.nodes)
        out = []
        for kv in kvs:
            node = t.Node.FromString(kv.value)
            st = self.nodes.get(node.name)
            if st:
                node.allocated.CopyFrom(st.allocated())
                node.running_tasks = len(st.attempts)
            node.lease_id = kv.lease
            out.append(node)
        return out

    # Cancel -----------------------------------------------------------------------------------

    def cancel(self, run_id: str, task: str, reason: str) -> None:
        """Ask to cancel a run, or one task of it (desired state; the engine converges)."""
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} not found or already finished")
        if run.msg.state in lc.RUN_TERMINAL:
            raise FailedPrecondition(f"run {run_id} already {lc.run_state_name(run.msg.state)}")
        if task:
            entry = run.tasks.get(task)
            if entry is None:
                raise NotFound(f"task {task!r} not found in run {run_id}")
            if entry.msg.state in lc.TASK_TERMINAL:
                raise FailedPrecondition(
                    f"task {task} already {lc.task_state_name(entry.msg.state)}"
                )
            targets = [entry]
        else:
            run.msg.cancel_requested = True
            run.msg.message = reason or "cancelled by user"
            self.committer.mark(run)
            targets = [e for e in run.tasks.values() if e.msg.state not in lc.TASK_TERMINAL]
        for e in targets:
            self._cancel_task(run, e, reason or "cancelled by user")
        self._finish_run_if_done(run)

    def _cancel_task(self, run: RunEntry, e: TaskEntry, reason: str) -> None:
        st = e.msg.state
        if st in lc.TASK_TERMINAL:
            return  # e.g. skipped because an upstream task was cancelled a moment ago
        e.msg.cancel_requested = True
        if st in lc.TASK_ACTIVE:
            node = self.nodes.get(e.msg.node)
            ref = agent_pb2.AttemptRef(
                run_id=run.msg.id, task=e.msg.spec.name, attempt=e.msg.attempt
            )
            grace = duration_pb2.Duration()
            grace.FromNanoseconds(int(self.config.cancel_grace * 1e9))
            if node and node.session:
                node.session.send(
                    agent_pb2.ControllerMessage(
                        cancel=agent_pb2.CancelTask(ref=ref, reason=reason, grace=grace)
                    )
                )
            self.committer.mark(e)
            return  # the agent's CANCELLED report finishes it
        self.ready.pop((run.msg.id, e.msg.spec.name), None)
        timer = self._timers.pop((run.msg.id, e.msg.spec.name), None)
        if timer:
            timer.cancel()
        e.msg.message = reason
        self._finish_task(run, e, lc.CANCELLED)

    # Agents -----------------------------------------------------------------------------------

    async def register(
        self, session: AgentSession, reg: agent_pb2.Register
    ) -> agent_pb2.Registered:
        """Record a node, bind it to a lease, apply its pending reports, reconcile its attempts."""
        st = self._node(reg.node)
        old = st.session
        if old is not None and old is not session:
            old.close()
        lease = 0
        if st.lease_id:
            try:
                if await self.store.keepalive(st.lease_id) > 0:
                    lease = st.lease_id
            except Exception:  # an expired or unknown lease just means a new one
                lease = 0
        if not lease:
            lease = await self.store.grant_lease(self.config.lease_ttl)
        node = t.Node(
            name=reg.node,
            capacity=reg.capacity,
            gpus=reg.gpus,
            labels=reg.labels,
            agent_version=reg.agent_version,
            runtime=reg.runtime,
            registered_at=now(),
            lease_id=lease,
            max_tasks=reg.max_tasks,
        )
        await self.store.txn([], [Put(self.keys.node(reg.node), node.SerializeToString(), lease)])
        st.capacity.CopyFrom(reg.capacity)
        st.gpu_indices = sorted(g.index for g in reg.gpus)
        st.labels = dict(reg.labels)
        st.max_tasks = reg.max_tasks
        st.lease_id = lease
        st.session = session
        st.last_heartbeat = time.monotonic()
        for report in reg.pending_reports:
            self.on_status(session, report)
        running = {(r.run_id, r.task, r.attempt) for r in reg.running}
        for run_id, name in list(st.attempts):
            run = self.runs.get(run_id)
            e = run.tasks.get(name) if run else None
            if e is None or e.msg.node != reg.node:
                continue
            ref = (run_id, name, e.msg.attempt)
            if ref in running:
                if e.msg.state == lc.SCHEDULED:
                    self._mark_running(run, e, None)
                if e.msg.cancel_requested:  # asked while the agent was away
                    self._send_cancel(session, run_id, name, e.msg.attempt, "cancelled")
            elif e.msg.state == lc.SCHEDULED:
                self._send_assignment(run, e)  # the agent never got it
            else:
                self._lose(run, e, f"node {reg.node} restarted without the attempt")
        for run_id, name, attempt in running:
            run = self.runs.get(run_id)
            e = run.tasks.get(name) if run else None
            if (
                e is None
                or e.msg.attempt != attempt
                or e.msg.node != reg.node
                or e.msg.state not in lc.TASK_ACTIVE
            ):
                self._send_cancel(session, run_id, name, attempt, "stale attempt")
        self._kick.set()
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self.config.heartbeat_interval * 1e9))
        ttl = duration_pb2.Duration(seconds=self.config.lease_ttl)
        log.info("node registered", node=reg.node, cpu=reg.capacity.cpu, gpus=len(reg.gpus))
        return agent_pb2.Registered(heartbeat_interval=interval, lease_ttl=ttl)

    async def heartbeat(self, session: AgentSession, hb: agent_pb2.Heartbeat) -> bool:
        """Keep the node's lease alive; False when it has expired (the agent must re-register).

        Also compares what the agent runs with what it should: an attempt RUNNING here that
        the agent has not listed in two heartbeats in a row (its final report would have come
        in between) was lost on the node, and is retried.
        """
        st = self.nodes.get(session.node)
        if st is None or st.session is not session:
            return False
        listed = {(r.run_id, r.task, r.attempt) for r in hb.running}
        missing = set()
        for run_id, name in list(st.attempts):
            run = self.runs.get(run_id)
            e = run.tasks.get(name) if run else None
            if e is None or e.msg.state != lc.RUNNING or e.msg.node != st.name:
                continue
            key = (run_id, name, e.msg.attempt)
            if key not in listed:
                if key in st.unlisted:
                    self._lose(run, e, f"node {st.name} no longer runs the attempt")
                else:
                    missing.add(key)
        st.unlisted = missing
        st.last_heartbeat = time.monotonic()
        ttl = await self.store.keepalive(st.lease_id)
        return ttl > 0

    def disconnected(self, session: AgentSession) -> None:
        """The agent's stream ended. Its node stays until the lease expires."""
        st = self.nodes.get(session.node)
        if st is not None and st.session is session:
            st.session = None
        session.close()

    def on_event(self, session: AgentSession, report: agent_pb2.TaskEventReport) -> None:
        """Record an event of the current attempt (older attempts' events are dropped)."""
        run = self.runs.get(report.ref.run_id)
        e = run.tasks.get(report.ref.task) if run else None
        if e is None or e.msg.attempt != report.ref.attempt or e.msg.node != session.node:
            return
        e.msg.events.append(report.event)
        if len(e.msg.events) > _MAX_EVENTS:
            del e.msg.events[: len(e.msg.events) - _MAX_EVENTS]
        self.committer.mark(e)

    def on_status(self, session: AgentSession, s: agent_pb2.TaskStatus) -> None:
        """Apply an agent's report about one attempt, fenced by the attempt number."""
        if s.ref.run_id in self._reloading:
            return  # neither ack nor kill on a half-loaded run: the agent reports again
        run = self.runs.get(s.ref.run_id)
        e = run.tasks.get(s.ref.task) if run else None
        final = s.state in _FINAL_REPORTS
        stale = (
            e is None
            or s.ref.attempt != e.msg.attempt
            or e.msg.node != session.node
            or e.msg.state not in lc.TASK_ACTIVE
        )
        if stale:
            if final and e is not None:
                # Acknowledge only once what this attempt's record says is in etcd: the
                # result may still be on its way there (a resent report overtaking its write).
                self.committer.when_written(e, self._acker(session, s.ref))
            elif final:
                self._ack(session, s.ref)
            else:
                self._send_cancel(session, s.ref.run_id, s.ref.task, s.ref.attempt, "stale attempt")
            return
        assert run is not None and e is not None
        if s.state == lc.RUNNING:
            self._mark_running(run, e, s)
            return
        if not final:
            log.warning("ignoring report", state=s.state, task=s.ref.task)
            return
        self._record_result(run, e, s, session)

    def _mark_running(self, run: RunEntry, e: TaskEntry, s: agent_pb2.TaskStatus | None) -> None:
        if e.msg.state != lc.SCHEDULED:
            return
        lc.move_task(e.msg, lc.RUNNING)
        started = s.started_at if s and s.HasField("started_at") else now()
        e.msg.started_at.CopyFrom(started)
        if e.msg.attempts:
            e.msg.attempts[-1].state = lc.RUNNING
            e.msg.attempts[-1].started_at.CopyFrom(started)
        self.committer.mark(e)

    def _record_result(
        self, run: RunEntry, e: TaskEntry, s: agent_pb2.TaskStatus, session: AgentSession
    ) -> None:
        m = e.msg
        att = m.attempts[-1] if m.attempts else m.attempts.add(number=m.attempt)
        att.state = s.state
        att.exit_code = s.exit_code
        att.reason = s.reason
        att.message = s.message
        if s.HasField("started_at"):
            att.started_at.CopyFrom(s.started_at)
            m.started_at.CopyFrom(s.started_at)
        finished = s.finished_at if s.HasField("finished_at") else now()
        att.finished_at.CopyFrom(finished)
        m.exit_code = s.exit_code
        m.reason = s.reason
        m.message = s.message
        m.stdout_tail = s.stdout_tail[-4096:]
        m.stderr_tail = s.stderr_tail[-4096:]
        self._account(e, -1)
        with self.tracer.start_as_current_span(
            f"record {m.spec.name}",
            context=context_from_traceparent(m.traceparent),
            attributes={
                "tether.run_id": run.msg.id,
                "tether.task": m.spec.name,
                "tether.attempt": m.attempt,
                "tether.state": lc.task_state_name(s.state),
                "tether.exit_code": s.exit_code,
            },
        ):
            ack = self._acker(session, s.ref)
            if s.state == lc.SUCCEEDED:
                if len(s.outputs_json) > _MAX_OUTPUT:
                    att.state = lc.FAILED
                    att.reason = m.reason = "output"
                    m.message = att.message = f"output larger than {_MAX_OUTPUT} bytes"
                    self._fail_or_retry(run, e, ack)
                    return
                m.outputs_json = s.outputs_json
                m.finished_at.CopyFrom(finished)
                self._finish_task(run, e, lc.SUCCEEDED, ack)
            elif s.state == lc.CANCELLED or m.cancel_requested:
                m.finished_at.CopyFrom(finished)
                self._finish_task(run, e, lc.CANCELLED, ack)
            else:
                self._fail_or_retry(run, e, ack)

    def _fail_or_retry(self, run: RunEntry, e: TaskEntry, ack: Callable[[], None] | None) -> None:
        m = e.msg
        failures = m.attempt - m.lost_attempts
        if failures <= m.spec.retries and not m.cancel_requested:
            delay = retry_delay(m.spec, failures, self.config)
            lc.move_task(m, lc.RETRYING)
            nb = timestamp_pb2.Timestamp()
            nb.FromNanoseconds(int((time.time() + delay) * 1e9))
            m.not_before.CopyFrom(nb)
            self.committer.mark(e, ack)
            self._arm_retry(run, e, delay)
            log.info(
                "task retrying",
                run_id=run.msg.id,
                task=m.spec.name,
                attempt=m.attempt,
                delay=round(delay, 3),
                reason=m.reason,
            )
        else:
            m.finished_at.CopyFrom(now())
            self._finish_task(run, e, lc.FAILED, ack)

    def _arm_retry(self, run: RunEntry, e: TaskEntry, delay: float) -> None:
        key = (run.msg.id, e.msg.spec.name)
        old = self._timers.pop(key, None)
        if old:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._retry_due, key)

    def _retry_due(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        run = self.runs.get(key[0])
        e = run.tasks.get(key[1]) if run else None
        if e is None or e.msg.state not in (lc.RETRYING, lc.LOST):
            return
        lc.move_task(e.msg, lc.READY)
        self.committer.mark(e)
        self._enqueue(key)
        self._kick.set()

    def _lose(self, run: RunEntry, e: TaskEntry, why: str) -> None:
        """The attempt's node is gone: LOST, then READY again (not counted as a failure)."""
        m = e.msg
        self._account(e, -1)
        if m.attempts:
            m.attempts[-1].state = lc.LOST
            m.attempts[-1].reason = "node_lost"
            m.attempts[-1].message = why
            m.attempts[-1].finished_at.CopyFrom(now())
        m.reason, m.message = "node_lost", why
        if m.cancel_requested:
            lc.move_task(m, lc.CANCELLED)
            m.finished_at.CopyFrom(now())
            self._finish_task(run, e, lc.CANCELLED, already_moved=True)
            return
        lc.move_task(m, lc.LOST)
        m.lost_attempts += 1
        self.metrics.attempts_lost.inc()
        self.committer.mark(e)
        log.warning("attempt lost", run_id=run.msg.id, task=m.spec.name, attempt=m.attempt, why=why)
        self._arm_retry(run, e, 0.0)

    def _expire_orphans(self, orphans: set[tuple[str, str]]) -> None:
        for run_id, name in orphans:
            run = self.runs.get(run_id)
            e = run.tasks.get(name) if run else None
            if e is None or e.msg.state not in lc.TASK_ACTIVE:
                continue
            node = self.nodes.get(e.msg.node)
            if node is None or node.session is None:
                self._lose(run, e, f"node {e.msg.node} did not come back")

    def _node_deleted(self, name: str, lease: int) -> None:
        st = self.nodes.get(name)
        if st is None:
            return
        if lease and st.lease_id and lease != st.lease_id:
            # The record of an old lease expired after the agent had already registered
            # again under a new one: the node is alive.
            return
        if st.session is not None:
            st.session.close()
            st.session = None
        st.lease_id = 0
        for run_id, task in list(st.attempts):
            run = self.runs.get(run_id)
            e = run.tasks.get(task) if run else None
            if e is not None and e.msg.state in lc.TASK_ACTIVE and e.msg.node == name:
                self._lose(run, e, f"node {name} lost (lease expired)")
        log.warning("node lost", node=name)

    async def _watch_nodes(self, revision: int) -> None:
        while True:
            try:
                async for ev in self.store.watch(self.keys.nodes, revision):
                    revision = ev.revision + 1
                    if ev.deleted:
                        self._node_deleted(ev.key.rsplit("/", 1)[1], ev.prev_lease)
            except asyncio.CancelledError:
                raise
            except OutOfRange:
                # etcd compacted past where we were: what is gone now was deleted meanwhile.
                kvs, listed = await self.store.range(self.keys.nodes)
                alive = {kv.key.rsplit("/", 1)[1] for kv in kvs}
                for name, st in list(self.nodes.items()):
                    if name not in alive and st.lease_id:
                        self._node_deleted(name, 0)
                revision = listed + 1
                log.warning("node watch resumed after compaction", revision=revision)
            except Exception as e:  # keep watching through etcd hiccups
                log.warning("node watch broke; resuming", error=str(e))
                await asyncio.sleep(0.5)

    def _ack(self, session: AgentSession, ref: agent_pb2.AttemptRef) -> None:
        session.send(agent_pb2.ControllerMessage(ack=agent_pb2.StatusAck(ref=ref)))

    def _acker(self, session: AgentSession, ref: agent_pb2.AttemptRef) -> Callable[[], None]:
        r = agent_pb2.AttemptRef()
        r.CopyFrom(ref)
        return lambda: self._ack(session, r)

    def _send_cancel(
        self, session: AgentSession, run_id: str, task: str, attempt: int, reason: str
    ) -> None:
        grace = duration_pb2.Duration()
        grace.FromNanoseconds(int(self.config.cancel_grace * 1e9))
        session.send(
            agent_pb2.ControllerMessage(
                cancel=agent_pb2.CancelTask(
                    ref=agent_pb2.AttemptRef(run_id=run_id, task=task, attempt=attempt),
                    reason=reason,
                    grace=grace,
                )
            )
        )

    # Reconcile ------------------------------------------------------------------------------

    def _arm_deadline(self, run: RunEntry) -> None:
        if not run.msg.HasField("deadline") or run.msg.state in lc.RUN_TERMINAL:
            return
        delay = max(0.0, run.msg.deadline.ToNanoseconds() / 1e9 - time.time())
        self._other_timers.append(
            asyncio.get_running_loop().call_later(delay, self._deadline_due, run.msg.id)
        )

    def _deadline_due(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        if run is None or run.msg.state in lc.RUN_TERMINAL or run.msg.timed_out:
            return
        run.msg.timed_out = True
        spec_timeout = run.msg.deadline.ToNanoseconds() - run.msg.created_at.ToNanoseconds()
        reason = f"run timed out after {spec_timeout / 1e9:g}s"
        log.warning("run timed out", run_id=run_id)
        self.cancel(run_id, "", reason)

    def _reconcile_run(self, run: RunEntry) -> None:
        """Bring a loaded run forward: ready what can run, skip what can't, re-arm timers."""
        self._arm_deadline(run)
        if run.msg.cancel_requested:
            for e in list(run.tasks.values()):
                if e.msg.state not in lc.TASK_TERMINAL:
                    self._cancel_task(run, e, run.msg.message or "cancelled by user")
        for e in sorted(run.tasks.values(), key=lambda x: x.msg.index):
            m = e.msg
            if m.state == lc.PENDING:
                self._advance(run, e)
            elif m.state == lc.READY:
                self._enqueue((run.msg.id, m.spec.name))
            elif m.state in (lc.RETRYING, lc.LOST):
                delay = max(0.0, m.not_before.ToNanoseconds() / 1e9 - time.time())
                self._arm_retry(run, e, delay if m.state == lc.RETRYING else 0.0)
            elif m.state == lc.SCHEDULED:
                # The assignment may never have left (its write's reply was lost, say); agents
                # ignore a repeated one. Without a session, registration sends it.
                self._send_assignment(run, e)
        self._finish_run_if_done(run)

    @staticmethod
    def _satisfies(m: t.TaskRun) -> bool:
        """Whether a finished upstream task lets its dependents run."""
        return m.state == lc.SUCCEEDED or (m.state == lc.FAILED and m.spec.allow_failure)

    def _advance(self, run: RunEntry, e: TaskEntry) -> None:
        """Count a PENDING task's unfinished upstream tasks; ready or skip it if it can be.

        Used when a run is (re)loaded; afterwards the count is kept up to date as upstream
        tasks finish, so a fan-in of thousands costs O(1) per finished task, not O(n).
        """
        if e.msg.state != lc.PENDING:
            return
        e.waiting = 0
        for dep in e.msg.spec.depends_on:
            d = run.tasks[dep].msg
            if self._satisfies(d):
                continue
            if d.state in lc.TASK_TERMINAL:
                self._skip(run, e, dep)
                return
            e.waiting += 1
        if e.waiting == 0:
            self._make_ready(run, e)

    def _make_ready(self, run: RunEntry, e: TaskEntry) -> None:
        lc.move_task(e.msg, lc.READY)
        self.committer.mark(e)
        self._enqueue((run.msg.id, e.msg.spec.name))
        self._kick.set()

    def _skip(self, run: RunEntry, e: TaskEntry, upstream: str) -> None:
        d = run.tasks[upstream].msg
        e.msg.message = f"upstream task {upstream} {lc.task_state_name(d.state).lower()}"
        self._finish_task(run, e, lc.SKIPPED)

    def _finish_task(
        self,
        run: RunEntry,
        e: TaskEntry,
        state: int,
        ack: Callable[[], None] | None = None,
        already_moved: bool = False,
    ) -> None:
        # Skips cascade down the DAG through a work list, not recursion: a chain may be
        # thousands of tasks long.
        work = [(e, state, ack, already_moved)]
        while work:
            e, state, ack, already_moved = work.pop()
            if not already_moved and e.msg.state in lc.TASK_TERMINAL:
                continue  # skipped already, through another failed upstream task
            if not already_moved:
                lc.move_task(e.msg, state)
            if not e.msg.HasField("finished_at"):
                e.msg.finished_at.CopyFrom(now())
            run.unfinished -= 1
            self._ready_since.pop((run.msg.id, e.msg.spec.name), None)
            self.metrics.tasks_finished.labels(lc.task_state_name(e.msg.state)).inc()
            self.committer.mark(e, ack)
            ok = self._satisfies(e.msg)
            for name in e.children:
                child = run.tasks[name]
                if child.msg.state != lc.PENDING:
                    continue
                if ok:
                    child.waiting -= 1
                    if child.waiting <= 0:
                        self._make_ready(run, child)
                else:
                    child.msg.message = (
                        f"upstream task {e.msg.spec.name} {lc.task_state_name(e.msg.state).lower()}"
                    )
                    work.append((child, lc.SKIPPED, None, False))
        self._finish_run_if_done(run)

    def _finish_run_if_done(self, run: RunEntry) -> None:
        if run.unfinished > 0 or run.msg.state in lc.RUN_TERMINAL:
            return
        states = [e.msg for e in run.tasks.values()]
        if run.msg.timed_out:
            final = lc.RUN_FAILED
        elif run.msg.cancel_requested:
            final = lc.RUN_CANCELLED
        elif any(
            (m.state == lc.FAILED and not m.spec.allow_failure)
            or m.state in (lc.CANCELLED, lc.SKIPPED)
            for m in states
        ):
            final = lc.RUN_FAILED
            failed = [
                m.spec.name for m in states if m.state == lc.FAILED and not m.spec.allow_failure
            ]
            run.msg.message = run.msg.message or (
                f"failed tasks: {', '.join(failed)}" if failed else "tasks were cancelled"
            )
        else:
            final = lc.RUN_SUCCEEDED
        lc.move_run(run.msg, final)
        run.msg.finished_at.CopyFrom(now())
        # Once the final state is in etcd the run leaves memory: reads of finished runs go to
        # etcd, so a long-lived controller holds only what is still running.
        self.committer.mark(run, lambda: self._evict(run))
        log.info("run finished", run_id=run.msg.id, state=lc.run_state_name(final))

    async def _retention_loop(self) -> None:
        """Delete finished runs older than the retention, so etcd does not grow forever."""
        period = min(max(self.config.retention / 4, 0.5), 60.0)
        while True:
            await asyncio.sleep(period)
            try:
                await self.collect_garbage()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # try again next period
                log.warning("retention pass failed", error=str(e))

    async def collect_garbage(self) -> int:
        """One retention pass; return how many finished runs were deleted."""
        cutoff = time.time() - self.config.retention
        kvs, _ = await self.store.range(self.keys.runs)
        deleted = 0
        for kv in kvs:
            msg = t.Run.FromString(kv.value)
            if msg.state not in lc.RUN_TERMINAL or msg.id in self.runs:
                continue
            if msg.finished_at.ToNanoseconds() / 1e9 > cutoff:
                continue
            ops = [Delete(kv.key), Delete(self.keys.tasks_of(msg.id), prefix=True)]
            if msg.request_id:
                ops.append(Delete(self.keys.request(msg.request_id)))
            # Compare: the run is still the finished record we read (nobody revived it).
            ok, _ = await self.store.txn([mod_revision_is(kv.key, kv.mod_revision)], ops)
            deleted += ok
        if deleted:
            log.info("deleted finished runs past retention", runs=deleted)
        return deleted

    def _evict(self, run: RunEntry) -> None:
        if self.runs.get(run.msg.id) is run and run.msg.state in lc.RUN_TERMINAL:
            del self.runs[run.msg.id]

    # Scheduling -------------------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                self._schedule_pass()
            except Exception:  # a bug in one pass must not stop scheduling
                log.exception("scheduling pass failed")
            await asyncio.sleep(0)

    def _schedule_pass(self) -> None:
        nodes = sorted((n for n in self.nodes.values() if n.schedulable), key=lambda n: n.name)
        if not self.ready:
            return
        full: set[tuple[float, int, int]] = set()

        def slots_left() -> bool:
            return any(n.max_tasks <= 0 or len(n.attempts) < n.max_tasks for n in nodes)

        if not slots_left():
            return  # every node is at its task limit: nothing in the queue can be placed
        for key in list(self.ready):
            run = self.runs.get(key[0])
            e = run.tasks.get(key[1]) if run else None
            if e is None or e.msg.state != lc.READY:
                self.ready.pop(key, None)
                continue
            r = e.msg.spec.resources
            shape = (r.cpu, r.memory_bytes, r.gpu)
            if shape in full:
                continue
            placement = first_fit(r, nodes)
            if placement is None:
                if not slots_left():
                    return
                full.add(shape)
                why = never_fits(r, nodes)
                if why and e.msg.waiting_reason != why:
                    e.msg.waiting_reason = why
                    self.committer.mark(e)
                continue
            self.ready.pop(key, None)
            try:
                rendered = self._render(run, e.msg.spec)
            except TemplateError as err:
                e.msg.reason, e.msg.message = "template", str(err)
                self._finish_task(run, e, lc.FAILED)
                continue
            self._bind(run, e, placement.node, placement.gpu_indices, rendered)

    def _render(self, run: RunEntry, spec: t.TaskSpec) -> t.TaskSpec | None:
        """The spec with templates filled in from params and upstream outputs (None: none)."""

        def output_of(name: str):
            raw = run.tasks[name].msg.outputs_json if name in run.tasks else ""
            return json.loads(raw) if raw else None

        return render_spec(spec, run.msg.params, output_of)

    def _enqueue(self, key: tuple[str, str]) -> None:
        self.ready[key] = None
        self._ready_since.setdefault(key, time.monotonic())

    def _bind(
        self,
        run: RunEntry,
        e: TaskEntry,
        node: NodeState,
        gpus: list[int],
        rendered: t.TaskSpec | None = None,
    ) -> None:
        since = self._ready_since.pop((run.msg.id, e.msg.spec.name), None)
        if since is not None:
            self.metrics.schedule_latency.observe(time.monotonic() - since)
        self.metrics.attempts_started.inc()
        m = e.msg
        lc.move_task(m, lc.SCHEDULED)
        m.attempt += 1
        m.node = node.name
        m.waiting_reason = ""
        m.ClearField("not_before")
        m.attempts.add(
            number=m.attempt,
            node=node.name,
            state=lc.SCHEDULED,
            scheduled_at=now(),
            gpu_indices=gpus,
        )
        self._account(e, +1)
        if run.msg.state == lc.RUN_PENDING:
            lc.move_run(run.msg, lc.RUN_RUNNING)
            run.msg.started_at.CopyFrom(now())
            self.committer.mark(run)
        e.rendered = rendered
        self.committer.mark(e, lambda: self._send_assignment(run, e))

    def _send_assignment(self, run: RunEntry, e: TaskEntry) -> None:
        m = e.msg
        if m.state not in lc.TASK_ACTIVE:
            return
        node = self.nodes.get(m.node)
        if node is None or node.session is None:
            return  # sent again when the node registers; lost if it never does
        upstream = {d: run.tasks[d].msg.outputs_json for d in m.spec.depends_on}
        with self.tracer.start_as_current_span(
            f"dispatch {m.spec.name}",
            context=context_from_traceparent(m.traceparent),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "tether.run_id": run.msg.id,
                "tether.task": m.spec.name,
                "tether.attempt": m.attempt,
                "tether.node": m.node,
            },
        ) as span:
            gpus = list(m.attempts[-1].gpu_indices) if m.attempts else []
            try:
                # After a controller restart the rendered spec is rebuilt from etcd's state.
                spec = e.rendered or self._render(run, m.spec) or m.spec
            except TemplateError:
                spec = m.spec
            node.session.send(
                agent_pb2.ControllerMessage(
                    assign=agent_pb2.AssignTask(
                        ref=agent_pb2.AttemptRef(
                            run_id=run.msg.id, task=m.spec.name, attempt=m.attempt
                        ),
                        spec=spec,
                        upstream_outputs=upstream,
                        gpu_indices=gpus,
                        traceparent=traceparent_of(span),
                        params=run.msg.params,
                    )
                )
            )
            if m.cancel_requested:  # cancelled between the bind and its commit
                self._send_cancel(node.session, run.msg.id, m.spec.name, m.attempt, "cancelled")

    def _node(self, name: str) -> NodeState:
        st = self.nodes.get(name)
        if st is None:
            st = self.nodes[name] = NodeState(name)
        return st

    def _account(self, e: TaskEntry, sign: int) -> None:
        """Add (+1) or remove (-1) an attempt's resources on its node."""
        node = self._node(e.msg.node)
        key = (e.msg.run_id, e.msg.spec.name)
        r = e.msg.spec.resources
        if sign > 0:
            if key in node.attempts:
                return
            node.attempts.add(key)
            node.cpu_used += r.cpu
            node.memory_used += r.memory_bytes
            if e.msg.attempts:
                node.gpus_used.update(e.msg.attempts[-1].gpu_indices)
        else:
            if key not in node.attempts:
                return
            node.attempts.discard(key)
            node.cpu_used = max(0.0, node.cpu_used - r.cpu)
            node.memory_used = max(0, node.memory_used - r.memory_bytes)
            if e.msg.attempts:
                node.gpus_used.difference_update(e.msg.attempts[-1].gpu_indices)
            self._kick.set()

    # Conflicts --------------------------------------------------------------------------------

    def _on_conflict(self, records: list) -> None:
        run_ids = set()
        for r in records:
            if isinstance(r, RunEntry):
                run_ids.add(r.msg.id)
            elif isinstance(r, TaskEntry):
                run_ids.add(r.msg.run_id)
        for run_id in run_ids - self._reloading:
            self._reloading.add(run_id)
            asyncio.get_running_loop().create_task(self._reload(run_id))

    async def _reload(self, run_id: str) -> None:
        """Someone else wrote this run: drop the cached copy and rebuild it from etcd."""
        try:
            old = self.runs.pop(run_id, None)
            if old:
                for e in old.tasks.values():
                    self._account(e, -1)
                    self.ready.pop((run_id, e.msg.spec.name), None)
            run_key, tasks_prefix = self.keys.run(run_id), self.keys.tasks_of(run_id)
            self.committer.forget(lambda k: k == run_key or k.startswith(tasks_prefix))
            kv = await self.store.get(run_key)
            if kv is None:
                return
            msg = t.Run.FromString(kv.value)
            if msg.state in lc.RUN_TERMINAL:
                return  # finished runs are read from etcd, not cached
            run = await self._load_run(msg, kv.mod_revision)
            self._reconcile_run(run)
            self._kick.set()
        finally:
            self._reloading.discard(run_id)


def _validate_request(request_id: str, params: dict[str, str]) -> None:
    from tether.sdk.validation import FieldViolation

    problems = []
    if len(request_id) > 128 or any(not c.isprintable() for c in request_id):
        problems.append(FieldViolation("request_id", "at most 128 printable characters"))
    for k, v in params.items():
        if not k or len(k) > 128:
            problems.append(FieldViolation(f"params.{k}", "keys must be 1-128 characters"))
        if len(v) > 4096:
            problems.append(FieldViolation(f"params.{k}", "values must be at most 4 KiB"))
    if problems:
        raise InvalidSpecError(problems)
