"""The workflow engine: one leadership term's controller, as a thin façade over its rooms.

etcd is the source of truth. The engine loads unfinished runs at start, keeps them in memory
(:mod:`~tether.controller.cache`), and changes them only through the lifecycle tables,
persisting each change with the :class:`Committer` (compare-and-swap on ``mod_revision``).
Side effects that reach agents happen only after the change is committed
(:mod:`~tether.controller.dispatch`), so a controller that dies mid-way leaves etcd in a state
the next one resumes from.

Where each concern lives: submitting runs in :mod:`~tether.controller.submit`, reads in
:mod:`~tether.controller.queries`, cancels and deadlines in :mod:`~tether.controller.cancel`,
nodes and their leases in :mod:`~tether.controller.nodes`, agents' reports, retries and lost
attempts in :mod:`~tether.controller.attempts`, the graph's rules in
:mod:`~tether.controller.dag` (applied by :mod:`~tether.controller.progress`), placement in
:mod:`~tether.controller.placement` over the pure :mod:`~tether.controller.scheduler`, loading
and reloading runs in :mod:`~tether.controller.loader`, retention in
:mod:`~tether.controller.retention`, timers in :mod:`~tether.controller.timers`.

Everything runs on one asyncio loop; methods that are not ``async`` never block.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from opentelemetry import trace

from tether.api.v1 import agent_pb2, controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.abandoned_submits import AbandonedSubmits
from tether.controller.attempts import Attempts
from tether.controller.cache import Cache, NodeState, Snapshot
from tether.controller.cancel import Cancels
from tether.controller.committer import Committer
from tether.controller.compaction import Compactor
from tether.controller.config import ControllerConfig
from tether.controller.dispatch import Dispatch
from tether.controller.durations import Durations
from tether.controller.errors import StoreUnavailable
from tether.controller.loader import Loader
from tether.controller.metrics import Metrics
from tether.controller.nodes import Nodes
from tether.controller.placement import Placer
from tether.controller.policies import get_policy
from tether.controller.progress import Progress
from tether.controller.queries import Queries
from tether.controller.records import AgentSession, RunEntry
from tether.controller.retention import Retention
from tether.controller.run_watch import RunWatch
from tether.controller.secrets import Secrets
from tether.controller.store import Store
from tether.controller.submit import Submitter
from tether.controller.timers import Timers
from tether.sdk.telemetry import get_logger

__all__ = ["Engine"]

log = get_logger("controller.engine")
# How long CancelRun waits for its request to be written to etcd before answering
# UNAVAILABLE (the cancel is only promised once it survives a controller restart).
CANCEL_WRITE_TIMEOUT = 10.0


class Engine:
    """Runs workflows: submit, reconcile, schedule, record results, cancel.

    Args:
        config: The controller's configuration.
        store: The etcd store.
        tracer: Tracer for the run, scheduling and dispatch spans.
        on_not_leader: Called when a write is refused because this controller no longer
            leads; the server then stops this engine.
        metrics: Where counters and latencies are recorded.
        secrets: The mesh's secrets, checked at submit and put into assignments.
    """

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        tracer: trace.Tracer,
        on_not_leader: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.started = time.monotonic()
        self._store = store
        self._cache = cache = Cache()
        self._timers = timers = Timers()
        # The loader exists only below; the committer reports conflicts to it when it does.
        self._run_watch = RunWatch()
        self._committer = committer = Committer(
            store,
            lambda records: self._loader.on_conflict(records),
            on_not_leader,
            on_written=self._run_watch.written,
        )
        self._dispatch = dispatch = Dispatch(config, cache, tracer, secrets)
        self._progress = progress = Progress(cache, committer, self.metrics, tracer)
        self._attempts = attempts = Attempts(
            config, tracer, cache, committer, self.metrics, dispatch, progress, timers
        )
        dispatch.unstartable = attempts.unstartable
        self._cancels = cancels = Cancels(cache, committer, dispatch, progress, timers)
        self._nodes = Nodes(config, store, cache, attempts, dispatch, timers)
        self._loader = Loader(store, cache, committer, progress, attempts, cancels, dispatch)
        self._loader.run_watch = self._run_watch
        self._durations = Durations(store, on_loaded=lambda wf: self._placer.learned(wf))
        attempts.durations = self._durations
        self._placer = Placer(
            cache,
            committer,
            self.metrics,
            dispatch,
            progress,
            get_policy(config.policy),
            self._durations,
            config.priority_aging,
            tracer,
            window=config.schedule_window,
        )
        self._placer.lose = attempts.lose
        self._submitter = Submitter(
            store,
            cache,
            self._loader.ensure_loaded,
            cancels.arm_deadline,
            config.limits,
            secrets,
            txn_bytes=config.submit_txn_bytes,
            binder=self._placer,
        )
        self._queries = Queries(store, cache, self._run_watch, committer.pending)
        self._retention = Retention(store, cache, config.retention)
        self._abandoned = AbandonedSubmits(store, config.pending_submit_ttl)
        self.compactor = Compactor(store, config.etcd_compaction_interval)
        self._tasks: list[asyncio.Task] = []

    # What tests and operators may look at; the rooms own the data. ---------------------------

    @property
    def runs(self) -> dict[str, RunEntry]:
        """Unfinished runs by id (the cache; read it, do not change it)."""
        return self._cache.runs

    @property
    def nodes(self) -> dict[str, NodeState]:
        """Known nodes by name (the cache; read it, do not change it)."""
        return self._cache.nodes

    @property
    def committer(self) -> Committer:
        """The writer of this term's changes to etcd."""
        return self._committer

    def snapshot(self) -> Snapshot:
        """What this engine holds now, as an immutable value (for metrics)."""
        return self._cache.snapshot()

    async def flushed(self) -> None:
        """Return once every change made so far is written to etcd."""
        await self._committer.flushed()

    # Start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished runs and known nodes from etcd, then start the loops."""
        revision = await self._loader.load_unfinished()
        registered = await self._nodes.load(revision)
        self._committer.start()
        self._tasks.append(asyncio.create_task(self._placer.loop(), name="scheduler"))
        self._tasks.append(asyncio.create_task(self._nodes.watch(revision + 1), name="node-watch"))
        self._tasks.append(asyncio.create_task(self._nodes.sweep(), name="node-sweep"))
        self._tasks.append(asyncio.create_task(self._nodes.lease.keep_alive(), name="node-lease"))
        if self.config.retention > 0:
            self._tasks.append(asyncio.create_task(self._retention.loop(), name="retention"))
        if 0 < self.config.pending_submit_ttl < 60:
            log.warning(
                "pending_submit_ttl is short: a large submit slower than it is deleted while "
                "it writes, and fails",
                pending_submit_ttl=self.config.pending_submit_ttl,
            )
        if self.config.pending_submit_ttl > 0:
            self._tasks.append(asyncio.create_task(self._abandoned.loop(), name="abandoned"))
        if self.config.etcd_compaction_interval > 0:
            self._tasks.append(asyncio.create_task(self.compactor.loop(), name="compaction"))
        # Attempts bound to nodes that are gone get their node's disconnect grace (a lease TTL
        # at least) to re-register before they are declared lost: an agent may be
        # reconnecting to this controller right now, and one cut off still runs them until
        # its grace is over.
        orphans: dict[float, set[tuple[str, str]]] = {}
        for r in self._cache.runs.values():
            for e in r.tasks.values():
                if e.msg.state in lc.TASK_ACTIVE and e.msg.node not in registered:
                    graces = [self._nodes.grace_of(n) for n, _ in gangs.placements(e.msg)]
                    wait = max(graces, default=float(self.config.lease_ttl))
                    orphans.setdefault(wait, set()).add((r.msg.id, e.msg.spec.name))
        for wait, keys in orphans.items():
            self._timers.later(wait, self._attempts.expire_orphans, keys)
        for run in list(self._cache.runs.values()):
            self._loader.reconcile(run)
        self._cache.kick()
        log.info(
            "engine started", runs=len(self._cache.runs), nodes=len(registered), revision=revision
        )

    async def stop(self) -> None:
        """Stop the loops, flush what can be flushed, cancel timers, end agent streams."""
        self._loader.stop()
        self._submitter.stop()
        self._nodes.closed = True  # no more writes from this term's handlers
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self._committer.stop()
        self._run_watch.stop()
        try:
            await self._durations.close()
        finally:
            # Even when this stop is itself cancelled (a step-down's stop, cut short by the
            # server's own): no timer fires and no agent stream lingers afterwards.
            self._timers.cancel_all()
            self._nodes.close_sessions()

    # Clients ----------------------------------------------------------------------------------

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
        return await self._submitter.submit(
            spec, params, request_id, traceparent, submitted_by, parent_traceparent
        )

    async def ensure_loaded(self, run_id: str) -> RunEntry | None:
        """The cached run; an unfinished run found only in etcd is loaded and reconciled."""
        return await self._loader.ensure_loaded(run_id)

    async def get_run(
        self, run_id: str, with_tasks: bool = True, out: t.Run | None = None
    ) -> t.Run:
        """Return a run (from the cache, or etcd for finished runs no longer cached); ``out``:
        the message to fill and return."""
        return await self._queries.get_run(run_id, with_tasks, out)

    async def get_task(self, run_id: str, task: str) -> t.TaskRun:
        """Return one task of a run; raises NotFound for an unknown run or task."""
        return await self._queries.get_task(run_id, task)

    async def list_runs(self, size: int, start_id: str | None) -> tuple[list[t.Run], bool]:
        """Up to ``size`` runs, newest first, from ``start_id`` on; and whether more follow."""
        return await self._queries.list_runs(size, start_id)

    def watch_run(
        self, run_id: str, from_revision: int, run_only: bool = False
    ) -> AsyncIterator[controller_pb2.RunEvent]:
        """A run's snapshot and changes until it finishes (see :meth:`Queries.watch_run`)."""
        return self._queries.watch_run(run_id, from_revision, run_only)

    async def cancel(self, run_id: str, task: str, reason: str) -> None:
        """Ask to cancel a run, or one task of it (desired state; the engine converges);
        return once the request is in etcd.

        Raises:
            NotLeader: deposed before the request was written.
            StoreUnavailable: not written within :data:`CANCEL_WRITE_TIMEOUT` (etcd slow, or
                the records were reloaded after a conflicting write): ask again.
        """
        records = self._cancels.cancel(run_id, task, reason)
        try:
            await asyncio.wait_for(self._committer.written(records), CANCEL_WRITE_TIMEOUT)
        except TimeoutError:
            raise StoreUnavailable(
                f"the cancel of run {run_id} is not in etcd after {CANCEL_WRITE_TIMEOUT:g}s;"
                " it may still take effect: cancel again"
            ) from None

    async def set_node_control(
        self, name: str, cordoned: bool, draining: bool = False, deadline: float = 0.0
    ) -> None:
        """Cordon, drain or uncordon a node (see :meth:`Nodes.set_control`)."""
        await self._nodes.set_control(name, cordoned, draining, deadline)

    async def list_nodes(self) -> list[t.Node]:
        """Registered nodes, with what is allocated on each."""
        return await self._nodes.list_nodes()

    async def collect_garbage(self) -> int:
        """One retention pass; return how many finished runs were deleted."""
        return await self._retention.collect_garbage()

    async def collect_abandoned_submits(self, ttl: float | None = None) -> int:
        """One pass over pending large submits; return how many abandoned ones were deleted
        (``ttl``: instead of the configured ``pending_submit_ttl``)."""
        return await self._abandoned.collect(ttl)

    # Agents -----------------------------------------------------------------------------------

    def session_of(self, node: str) -> AgentSession | None:
        """The open stream of a node's agent, or None when the node is not connected here."""
        return self._nodes.session_of(node)

    async def register(
        self, session: AgentSession, reg: agent_pb2.Register
    ) -> agent_pb2.Registered:
        """Record a node, bind it to a lease, apply its pending reports, reconcile its attempts."""
        return await self._nodes.register(session, reg)

    def heartbeat(self, session: AgentSession, hb: agent_pb2.Heartbeat) -> bool:
        """Renew the node's liveness; False when its lease time ran out (re-register)."""
        return self._nodes.heartbeat(session, hb)

    def disconnected(self, session: AgentSession) -> None:
        """The agent's stream ended. Its node stays until the lease expires."""
        self._nodes.disconnected(session)

    def on_status(self, session: AgentSession, s: agent_pb2.TaskStatus) -> None:
        """Apply an agent's report about one attempt, fenced by the attempt number."""
        self._attempts.on_status(session, s)

    def on_event(self, session: AgentSession, report: agent_pb2.TaskEventReport) -> None:
        """Record an event of the current attempt (older attempts' events are dropped)."""
        self._attempts.on_event(session, report)
