"""The scheduling loop: each pass asks :func:`tether.controller.scheduler.plan` where ready
tasks go (priorities, each workflow's policy, selectors, gangs), renders their templates and
binds them to their nodes, and starts the preemptions the plan chose. An assignment is sent
once its bind is committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from itertools import islice

from opentelemetry import trace

from tether.api.v1 import types_pb2 as t
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache, TaskKey, declared_priority
from tether.controller.committer import Committer
from tether.controller.critical_path import DEFAULT_SECONDS, remaining_paths
from tether.controller.dispatch import Dispatch, render
from tether.controller.durations import Durations
from tether.controller.metrics import Metrics
from tether.controller.policies import POLICIES
from tether.controller.progress import Progress
from tether.controller.records import RunEntry, TaskEntry, now
from tether.controller.scheduler import Binding, Plan, Policy, Preemption, TaskRequest, plan
from tether.controller.selectors import Constraints, Expr
from tether.sdk.constants import DEFAULT_PRIORITY
from tether.sdk.telemetry import context_from_traceparent, exports_spans, get_logger
from tether.sdk.templating import TemplateError

__all__ = ["Placer", "constraints_of", "run_ranks"]

# Runs with more tasks than this are placed without critical paths (FIFO within a priority).
RANKS_MAX_TASKS = 10_000

# A pass plans at least this many ready tasks, and up to this many per free task slot.
MIN_WINDOW = 64
CANDIDATES_PER_SLOT = 8

# Most rejected nodes a scheduling span lists.
MAX_REJECTED = 16

log = get_logger("controller.engine")


def constraints_of(spec: t.TaskSpec) -> Constraints:
    """The spec's ``node_selector`` and ``affinity`` as placement reads them."""
    required, preferred = [], []
    for a in spec.affinity:
        e = Expr(a.key, a.operator, tuple(a.values), a.weight)
        (preferred if a.weight > 0 else required).append(e)
    return Constraints(
        selector=tuple(sorted(spec.node_selector.items())),
        required=tuple(required),
        preferred=tuple(preferred),
    )


def run_ranks(run: RunEntry, learned: Mapping[str, float]) -> dict[str, float]:
    """Each task's longest remaining path (seconds), from its declared ``expected_duration``,
    else its ``learned`` duration, else :data:`DEFAULT_SECONDS`."""
    durations = {}
    for name, e in run.tasks.items():
        d = e.msg.spec.expected_duration
        declared = d.seconds + d.nanos / 1e9
        durations[name] = declared or learned.get(name, DEFAULT_SECONDS)
    return remaining_paths(
        durations, {n: list(e.msg.spec.depends_on) for n, e in run.tasks.items()}
    )


class Placer:
    """Places READY tasks on nodes whenever the cache is kicked."""

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        metrics: Metrics,
        dispatch: Dispatch,
        progress: Progress,
        policy: Policy,
        durations: Durations | None = None,
        aging: float = 0.0,
        tracer: trace.Tracer | None = None,
        window: int = 1024,
    ) -> None:
        self.tracer = tracer or trace.get_tracer("tether.controller")
        # A decision's span is a leaf nothing reads but a trace viewer: skipped (with its
        # list of rejected nodes, a tenth of the controller's CPU per task) when no spans
        # are exported.
        self.decision_spans = exports_spans()
        self.cache = cache
        self.committer = committer
        self.metrics = metrics
        self.dispatch = dispatch
        self.progress = progress
        self.policy = policy
        self.durations = durations
        self.aging = aging
        self.window = window
        # Tasks whose victims are being stopped -> those victims: no second preemption for
        # them until the first is over.
        self.preempting: dict[TaskKey, set[TaskKey]] = {}
        # Ends an attempt whose node is gone (the engine's Attempts.lose).
        self.lose: Callable[[RunEntry, TaskEntry, str], None] = lambda *_: None

    async def loop(self) -> None:
        """Run a pass each time the cache is kicked, until cancelled."""
        while True:
            await self.cache.wakeup.wait()
            self.cache.wakeup.clear()
            start = time.perf_counter()
            try:
                self.schedule_pass()
            except Exception:  # a bug in one pass must not stop scheduling
                log.exception("scheduling pass failed")
            if len(self.cache.ready) > self.window:
                # A long queue: let reports gather for about as long as the pass took, so that
                # the next one places a batch instead of the one slot freed meanwhile.
                await asyncio.sleep(min(time.perf_counter() - start, 0.01))
            else:
                await asyncio.sleep(0)

    def learned(self, workflow: str) -> None:
        """Durations of ``workflow`` were read: its runs' critical paths are computed again."""
        for run in self.cache.runs.values():
            if run.msg.workflow_name == workflow:
                run.ranks = None
        self.cache.kick()

    def _windows(self, size: int) -> Iterator[list[tuple[TaskKey, TaskEntry, int]]]:
        """The ready queue in order, ``window`` tasks at a time, each with its place in the
        queue; entries no longer READY leave it. Planning all of a 100,000-task fan-out for
        each freed slot would cost O(queue) per task, so a pass plans the oldest tasks first
        and goes on to the next window only while a node still has a free slot (``size``:
        how many tasks a window holds). Up to a window of tasks of a higher declared priority
        than the lowest of the oldest ones (the cache keeps the queue by priority level too)
        join the first window wherever they are in the queue, so that a long backlog of low
        priority cannot hold them back; the oldest still come first among equals, which is
        what lets aging lift a long-waiting task."""
        first = True
        skip = 0  # keys at the head of the queue that earlier windows left in it
        while True:
            # Only a window's worth is copied (binding takes keys out of the queue): copying
            # all of a long queue for every pass was most of a pass.
            chunk = list(islice(self.cache.ready.items(), skip, skip + size))
            out = []
            for key, seq in chunk:
                entry = self._ready_entry(key)
                if entry is not None:
                    out.append((key, entry, seq))
            if first:
                out += self._ranking_above(out, size)
                first = False
            if out:
                yield out
            if len(chunk) < size:
                return
            # A window of stale keys only (they left the queue above) is no reason to stop.
            skip += sum(1 for key, _ in chunk if key in self.cache.ready)

    def _window_size(self, views: list) -> int:
        """``window``, or fewer when few task slots are free: planning a thousand tasks for
        the handful of slots freed since the last pass was most of a busy controller's CPU.
        Several candidates per slot still let priorities and policies choose."""
        free = 0
        for v in views:
            if v.max_tasks <= 0:
                return self.window  # no slot limit: resources decide
            free += max(0, v.max_tasks - v.running)
        return min(self.window, max(MIN_WINDOW, CANDIDATES_PER_SLOT * free))

    def _ready_entry(self, key: TaskKey) -> TaskEntry | None:
        _, e = self.cache.task(*key)
        if e is None or e.msg.state != lc.READY:
            self.cache.unready(key, e)
            self.preempting.pop(key, None)
            return None
        return e

    def _ranking_above(
        self, head: list[tuple[TaskKey, TaskEntry, int]], most: int
    ) -> list[tuple[TaskKey, TaskEntry, int]]:
        """Up to ``most`` ready tasks not in ``head`` whose declared priority is above the
        lowest in ``head`` (all levels above the default when ``head`` is empty), highest
        level first, oldest first within one."""
        levels = self.cache.levels
        if len(levels) <= 1 and (not levels or head):
            return []  # one priority waits (the common case): nothing ranks above the head
        floor = min((declared_priority(e.msg.spec) for _, e, _ in head), default=DEFAULT_PRIORITY)
        have = {k for k, _, _ in head}
        out: list[tuple[TaskKey, TaskEntry, int]] = []
        for prio in sorted((p for p in self.cache.levels if p > floor), reverse=True):
            level = self.cache.levels[prio]
            for key, seq in list(islice(level.items(), len(have) + most)):
                if len(out) >= most:
                    return out
                if self.cache.ready.get(key) != seq:  # left the queue (or came back later)
                    del level[key]
                    continue
                if key in have:
                    continue
                entry = self._ready_entry(key)
                if entry is not None:
                    out.append((key, entry, seq))
            if not level:
                del self.cache.levels[prio]
        return out

    def _ranks(self, run: RunEntry) -> dict[str, float]:
        if run.ranks is None:
            if len(run.tasks) > RANKS_MAX_TASKS:
                # Seconds of Python for 100,000 tasks, on the loop or (worse: the loop then
                # waits for the GIL at every step, past the leader's lease) in a thread.
                run.ranks = {}
            else:
                learned = self.durations.of(run.msg.workflow_name) if self.durations else {}
                run.ranks = run_ranks(run, learned)
        return run.ranks

    def _request(
        self, seq: int, key: TaskKey, e: TaskEntry, clock: float, run: RunEntry | None = None
    ) -> TaskRequest:
        run = run or self.cache.runs[key[0]]
        victims = self.preempting.get(key)
        may_preempt = not victims or not self._still_stopping(victims)
        if e.request is not None:
            cached, ranks = e.request
            if cached.seq == seq and cached.may_preempt == may_preempt and ranks is run.ranks:
                return cached
        spec = e.msg.spec
        if e.constraints is None:
            e.constraints = constraints_of(spec)
        policy = POLICIES.get(run.msg.policy) if run.msg.policy else None
        ranks = (policy or self.policy).ranks
        request = TaskRequest(
            key,
            cpu=spec.resources.cpu,
            memory=spec.resources.memory_bytes,
            gpu=spec.resources.gpu,
            priority=spec.priority if spec.HasField("priority") else DEFAULT_PRIORITY,
            seq=seq,
            ready_at=self.cache.ready_since.get(key, clock),
            rank=self._ranks(run).get(spec.name, 0.0) if ranks else 0.0,
            constraints=e.constraints,
            preemptible=spec.preemptible,
            replicas=max(1, spec.replicas),
            policy=policy,
            may_preempt=may_preempt,
        )
        # Kept with the critical-path ranks it was built from: new durations make new ranks.
        e.request = (request, run.ranks)
        return request

    def _still_stopping(self, victims: set[TaskKey]) -> bool:
        for key in victims:
            _, v = self.cache.task(*key)
            if v is not None and v.msg.state in lc.TASK_ACTIVE and v.msg.preempted_by:
                return True
        return False

    def schedule_pass(self) -> None:
        """Place what can be placed now; note why tasks no node can hold are waiting."""
        if not self.cache.ready:
            return
        views = self.cache.connected_views()
        if not any(v.has_slot for v in views) and not any(
            r.preemptible and not r.stopping for v in views for r in v.attempts
        ):
            return  # nothing can be placed or preempted: the plan would place nothing
        for window in self._windows(self._window_size(views)):
            self._plan_window(window, views)
            views = self.cache.connected_views()
            if not any(v.has_slot for v in views):
                return

    def _plan_window(self, queue: list[tuple[TaskKey, TaskEntry, int]], views) -> None:
        clock = time.monotonic()
        while queue:
            ready = [self._request(seq, k, e, clock) for k, e, seq in queue]
            p = plan(ready, views, self.policy, now=clock, aging=self.aging)
            self._preempt(p)
            bound: dict[TaskKey, list[Binding]] = {}
            for b in p.bindings:
                bound.setdefault(b.key, []).append(b)
            entries = {k: e for k, e, _ in queue}
            for key, why in p.reasons.items():
                e = entries[key]
                if e.msg.waiting_reason != why:
                    e.msg.waiting_reason = why
                    self.committer.mark(e)
            done: set[TaskKey] = set()
            for key, bs in bound.items():  # in plan order
                done.add(key)
                if not self._place(key, entries[key], bs):
                    # Its template did not render and it holds nothing: plan the rest again,
                    # so what the plan kept for it goes to the tasks behind it.
                    break
            else:
                return
            queue = [q for q in queue if q[0] not in done]
            views = self.cache.connected_views()

    def _preempt(self, p: Plan) -> None:
        for pre in p.preemptions:
            self.preempting[pre.key] = {v.key for v in pre.victims.victims}
            for v in pre.victims.victims:
                self._stop_victim(pre, v.key)

    def _stop_victim(self, pre: Preemption, key: TaskKey) -> None:
        run, e = self.cache.task(*key)
        if run is None or e is None or e.msg.state not in lc.TASK_ACTIVE or e.msg.preempted_by:
            return
        by_run, by_task = pre.key
        _, by = self.cache.task(by_run, by_task)
        has = by is not None and by.msg.spec.HasField("priority")
        prio = by.msg.spec.priority if has else DEFAULT_PRIORITY
        m = e.msg
        m.preempted_by = f"{by_run}/{by_task}"
        why = f"preempted by {by_task} of run {by_run} (priority {prio})"
        node, attempt = m.node, m.attempt
        log.info("preempting", run_id=run.msg.id, task=m.spec.name, by=m.preempted_by)

        def stop() -> None:
            session = self.cache.nodes[node].session if node in self.cache.nodes else None
            if session is not None:
                self.dispatch.cancel(session, run.msg.id, m.spec.name, attempt, why, requeue=True)

        self.committer.mark(e, stop)

    def _place(self, key: TaskKey, e: TaskEntry, bs: list[Binding]) -> bool:
        """Render and bind one planned task (all replicas of a gang); False when its template
        failed it."""
        run = self.cache.runs[key[0]]
        self.cache.unready(key, e)
        self.preempting.pop(key, None)
        try:
            rendered = render(run, e.msg.spec)
        except TemplateError as err:
            e.msg.reason, e.msg.message = "template", str(err)
            self.progress.finish_task(run, e, lc.FAILED)
            return False
        self._bind(run, e, bs, rendered)
        return True

    def bind_submitted(self, run: RunEntry, entries: list[TaskEntry]) -> list[TaskEntry]:
        """Bind the first tasks of a run being submitted, if nothing waits in the queue and
        nodes have room: their SCHEDULED records then go in the submit's own transaction —
        one fsync'd etcd write fewer before they start, most of an idle mesh's latency.

        The run is not cached yet. Its attempts hold their nodes' resources from now on; the
        caller sends them with :meth:`submitted` once the transaction is committed, or gives
        them back with :meth:`unbind_submitted` if it is not.
        """
        if self.cache.ready:
            return []  # tasks wait already: the next pass places in queue order
        ready = [e for e in entries if e.msg.state == lc.READY]
        if not ready:
            return []
        views = self.cache.connected_views()
        if not any(v.has_slot for v in views):
            return []
        clock = time.monotonic()
        requests = [
            self._request(i, (run.msg.id, e.msg.spec.name), e, clock, run)
            for i, e in enumerate(ready)
        ]
        p = plan(requests, views, self.policy, now=clock, aging=self.aging, preempt=False)
        by_key = {(run.msg.id, e.msg.spec.name): e for e in ready}
        bound: dict[TaskKey, list[Binding]] = {}
        for b in p.bindings:
            bound.setdefault(b.key, []).append(b)
        out = []
        for key, bs in bound.items():
            e = by_key[key]
            try:
                rendered = render(run, e.msg.spec)
            except TemplateError:
                continue  # left READY: the first pass fails it as usual
            self._apply_bind(run, e, bs, rendered, span=False)
            out.append(e)
        return out

    def unbind_submitted(self, entries: list[TaskEntry]) -> None:
        """The submit that :meth:`bind_submitted` bound ``entries`` for was not written: their
        nodes' resources are free again."""
        for e in entries:
            self.cache.account(e, -1)

    def submitted(self, run: RunEntry, entries: list[TaskEntry]) -> None:
        """The submit's transaction holds the bound ``entries``: send their assignments. A
        node lost while it was being written had no attempt of this run to lose then: its
        attempts are lost now (never sent, so never running)."""
        # Ranks were computed before the run was cached: durations learned meanwhile did not
        # reset them (Placer.learned sees cached runs only).
        run.ranks = None
        for e in entries:
            self.metrics.attempts_started.inc()  # counted once written, not when undone
            gone = [
                name
                for name, _ in gangs.placements(e.msg)
                if (st := self.cache.nodes.get(name)) is None or not st.lease_id
            ]
            if gone:
                self.lose(run, e, f"node {gone[0]} lost before the attempt was sent")
                continue
            self.metrics.schedule_latency.observe(0.0)  # READY and bound at once
            if self.decision_spans:  # only now: a submit not written has no trace to join
                nodes = [name for name, _ in gangs.placements(e.msg)]
                bs = [Binding((run.msg.id, e.msg.spec.name), n) for n in nodes]
                self._decision_span(run, e, bs, 0.0, e.msg.attempt)
            self.dispatch.assign(run, e)

    def _bind(
        self, run: RunEntry, e: TaskEntry, bs: list[Binding], rendered: t.TaskSpec | None
    ) -> None:
        self.metrics.attempts_started.inc()
        if self._apply_bind(run, e, bs, rendered):
            self.committer.mark(run)
        self.committer.mark(e, lambda: self.dispatch.assign(run, e))

    def _apply_bind(
        self,
        run: RunEntry,
        e: TaskEntry,
        bs: list[Binding],
        rendered: t.TaskSpec | None,
        span: bool = True,
    ) -> bool:
        """Make the task's next attempt on the planned node(s) and charge them its resources;
        True when the run started with it (its record changed too)."""
        since = self.cache.ready_since.pop((run.msg.id, e.msg.spec.name), None)
        waited = time.monotonic() - since if since is not None else 0.0
        if since is not None:
            self.metrics.schedule_latency.observe(waited)
        if self.decision_spans and span:
            self._decision_span(run, e, bs, waited, e.msg.attempt + 1)
        m = e.msg
        first = bs[0]
        lc.move_task(m, lc.SCHEDULED)
        m.attempt += 1
        m.node = first.node
        m.waiting_reason = ""
        m.ClearField("not_before")
        m.ClearField("replicas")
        m.master_addr, m.master_port = "", 0
        lc.new_attempt(
            m,
            number=m.attempt,
            node=first.node,
            scheduled_at=now(),
            gpu_indices=list(first.gpu_indices),
        )
        if len(bs) > 1:
            for b in sorted(bs, key=lambda b: b.replica):
                m.replicas.add(
                    index=b.replica, node=b.node, gpu_indices=b.gpu_indices, state=lc.SCHEDULED
                )
            master = self.cache.nodes.get(first.node)
            m.master_addr = (master.address if master else "") or first.node
            m.master_port = (master.free_port if master else 0) or gangs.DEFAULT_MASTER_PORT
        self.cache.account(e, +1)
        e.rendered = rendered
        if run.msg.state == lc.RUN_PENDING:
            lc.move_run(run.msg, lc.RUN_RUNNING)
            run.msg.started_at.CopyFrom(now())
            return True
        return False

    def _decision_span(
        self, run: RunEntry, e: TaskEntry, bs: list[Binding], waited: float, attempt: int
    ) -> None:
        """One span per scheduling decision, from READY to bound: the policy, the node(s) it
        chose and why (some of) the others were turned down."""
        m = e.msg
        policy = POLICIES.get(run.msg.policy) if run.msg.policy else None
        chosen = {b.node for b in bs}
        end = time.time_ns()
        span = self.tracer.start_span(
            f"schedule {m.spec.name}",
            context=context_from_traceparent(m.traceparent),
            start_time=end - int(waited * 1e9),
            attributes={
                "tether.run_id": run.msg.id,
                "tether.task": m.spec.name,
                "tether.attempt": attempt,
                "tether.policy": (policy or self.policy).name,
                "tether.node": ",".join(b.node for b in bs),
                "tether.queue_wait_seconds": waited,
                "tether.rejected": self._rejected(m.spec.resources, chosen),
            },
        )
        span.end(end_time=end)

    def _rejected(self, r: t.Resources, chosen: set[str]) -> list[str]:
        """Up to :data:`MAX_REJECTED` other nodes and why each could not take ``r`` (or that
        it ranked lower), looking at no more than a few times that many: a span must stay
        cheap on a mesh of thousands of nodes."""
        out = []
        for i, (name, st) in enumerate(self.cache.nodes.items()):
            if len(out) >= MAX_REJECTED or i >= 4 * MAX_REJECTED:
                break
            if name in chosen or st.session is None:
                continue
            if not st.schedulable:
                out.append(f"{name}: cordoned or draining")
                continue
            out.append(f"{name}: {st.view().why_not(r) or 'ranked lower'}")
        return out
