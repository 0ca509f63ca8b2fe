"""Runs assigned attempts on this node: the one entry point the agent talks to.

Each attempt gets a directory ``<work_dir>/<run>/<task>/<attempt>/`` holding its inputs, its
output file, its logs and its final report. The work is split by concern:

* :mod:`tether.agent.launch`: the attempt's files, environment, labels and ``LaunchSpec``;
  the check of its output file;
* :mod:`tether.agent.supervision`: waiting for it, its timeout, cancelling it with a grace;
* :mod:`tether.agent.reports`: final reports kept until acknowledged (``status.pb``), and
  removal from the runtime on acknowledgement;
* :mod:`tether.agent.recovery`: adopting what a previous agent left in the runtime.

This module ties them together and wraps each attempt in its run span.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from tether.agent import launch
from tether.agent.config import AgentConfig
from tether.agent.metrics import AgentMetrics
from tether.agent.recovery import Found, found_attempts
from tether.agent.reports import Reports, saved_status
from tether.agent.runtimes.base import Runtime, RuntimeError_
from tether.agent.supervision import DEFAULT_CANCEL_GRACE, Attempt, Key, key_of, now, supervise
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.states import DRAINED, FENCED
from tether.sdk.telemetry import (
    context_from_traceparent,
    exports_spans,
    fixed_span_ids,
    get_logger,
    parse_traceparent,
    traceparent_of,
)

__all__ = ["Runner"]

log = get_logger("agent.runner")

# Reasons of failures that are the runtime's (or the agent's), not the task's.
_RUNTIME_REASONS = frozenset({"runtime_error", "image"})


_IDS = RandomIdGenerator()
# Cancels of attempts not assigned here that are remembered (see Runner._early_cancels).
_EARLY_CANCELS = 1024
# The step of an attempt when steps make no spans: one shared no-op context manager, rather
# than a generator-made one per step.
_NO_PHASE = contextlib.nullcontext()
# The attempt's span when spans are not exported: none (see Runner._traced).
_NO_SPAN = contextlib.nullcontext(None)
# traceparent -> its parts around the span id, so that each attempt's own is one format rather
# than a parse: the attempts of a run share their parent when the controller exports no spans.
# Bounded because when it does, every attempt has a parent of its own and none is seen again.
_PARENTS: dict[str, tuple[str, str]] = {}
_FAILED = t.TaskState.TASK_STATE_FAILED
_RUNNING = t.TaskState.TASK_STATE_RUNNING
_SUCCEEDED = t.TaskState.TASK_STATE_SUCCEEDED
# A final state's outcome label ("succeeded", ...), looked up once rather than per attempt.
_OUTCOMES = {v: name.removeprefix("TASK_STATE_").lower() for name, v in t.TaskState.items()}
_STATE_NAMES = {v: name for name, v in t.TaskState.items()}


class Runner:
    """Starts, watches and stops attempts; reports what it sees through ``report``.

    Args:
        config: The agent's configuration.
        runtime: Where attempts run.
        tracer: Tracer for the run spans.
        report: Called with every status to send to the controller.
        on_event: Called with every attempt event to send to the controller.
        metrics: Where attempts are counted and timed.
    """

    def __init__(
        self,
        config: AgentConfig,
        runtime: Runtime,
        tracer: trace.Tracer,
        report: Callable[[agent_pb2.TaskStatus], None],
        on_event: Callable[[agent_pb2.TaskEventReport], None] | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.tracer = tracer
        self.step_spans = exports_spans()
        self.report = report
        self.on_event = on_event
        self.attempts: dict[Key, Attempt] = {}
        self.metrics = metrics or AgentMetrics(config.node, runtime.name)
        self.metrics.count_running(lambda: len(self.attempts))
        self.reports = Reports()
        self._work_dir = config.work_dir.absolute()
        self.started_count = 0
        # Set while the agent drains itself: why new assignments are turned away.
        self.refusing = ""
        # Runs given an attempt since runs_in_use() was last called; kept only for the work
        # dir's cleaner (work_retention), which calls it, so that it never grows unread.
        self._recent_runs: set[str] | None = set() if config.work_retention > 0 else None
        # Cancels of attempts not assigned here (yet), the latest few: an assignment may come
        # after its own cancel (a drain's deadline between the bind and the assignment), and
        # must then not run.
        self._early_cancels: collections.OrderedDict[Key, agent_pb2.CancelTask] = (
            collections.OrderedDict()
        )

    @property
    def unacked(self) -> dict[Key, agent_pb2.TaskStatus]:
        """Final reports not acknowledged yet, by attempt."""
        return self.reports.unacked

    def event(self, ref: agent_pb2.AttemptRef, kind: str, message: str) -> None:
        """Tell the controller something happened to an attempt (best effort, not retried)."""
        if self.on_event is None:
            return
        ev = t.TaskEvent(time=now(), attempt=ref.attempt, kind=kind, message=message[:1024])
        self.on_event(agent_pb2.TaskEventReport(ref=ref, event=ev))

    def is_running(self, ref: agent_pb2.AttemptRef) -> bool:
        """Whether the attempt is assigned here and not over (its output may still grow)."""
        return key_of(ref) in self.attempts

    def running_refs(self) -> list[agent_pb2.AttemptRef]:
        """The attempts assigned here and not over."""
        return [a.ref for a in self.attempts.values()]

    def pending_reports(self) -> list[agent_pb2.TaskStatus]:
        """Final reports to send (again) until the controller acknowledges them."""
        return self.reports.pending()

    def runs_in_use(self) -> set[str]:
        """The run ids with attempts running here, final reports not yet acknowledged, or
        attempts assigned since the previous call: the runs whose directories the work dir's
        cleaner must leave alone (:mod:`tether.agent.retention`)."""
        recent = self._recent_runs or set()
        if self._recent_runs is not None:
            self._recent_runs = set()
        recent.update(key[0] for key in self.attempts)
        recent.update(key[0] for key in self.reports.unacked)
        return recent

    def assign(self, a: agent_pb2.AssignTask) -> None:
        """Start an attempt; a repeated assignment of the same attempt is ignored."""
        if self._recent_runs is not None:
            self._recent_runs.add(a.ref.run_id)
        key = key_of(a.ref)
        if key in self.attempts:
            return
        pending = self.reports.get(key)
        if pending is not None:
            self.report(pending)
            return
        if self._early_cancels:
            early = self._early_cancels.pop(key, None)
            if early is not None:  # cancelled before it arrived: never started
                status = agent_pb2.TaskStatus(
                    ref=a.ref,
                    state=_FAILED if early.requeue else t.TaskState.TASK_STATE_CANCELLED,
                    reason=DRAINED if early.requeue else "",
                    message=early.reason or "cancelled",
                    finished_at=now(),
                )
                self._conclude(Attempt(ref=a.ref), status, self._dir(a.ref))
                return
        if self.refusing:
            # Sent before the controller saw this node draining: hand it straight back, never
            # started, to be retried elsewhere free of charge.
            status = agent_pb2.TaskStatus(
                ref=a.ref,
                state=t.TaskState.TASK_STATE_FAILED,
                reason=DRAINED,
                message=self.refusing,
                finished_at=now(),
            )
            self._conclude(Attempt(ref=a.ref), status, self._dir(a.ref))
            return
        att = Attempt(ref=a.ref)
        self.attempts[key] = att
        att.task = asyncio.create_task(self._run(att, a), name=f"attempt {key}")

    def cancel(self, c: agent_pb2.CancelTask) -> None:
        """Stop an attempt (SIGTERM, then SIGKILL after the grace period)."""
        key = key_of(c.ref)
        att = self.attempts.get(key)
        if att is None:
            if key not in self.reports:  # not ended here either: its assignment may follow
                self._early_cancels[key] = c
                if len(self._early_cancels) > _EARLY_CANCELS:
                    self._early_cancels.popitem(last=False)
            return
        has_grace = c.HasField("grace")
        grace = c.grace.seconds + c.grace.nanos / 1e9 if has_grace else DEFAULT_CANCEL_GRACE
        if c.requeue:
            att.fence(c.reason or "node drained", grace, DRAINED)
        else:
            att.request_cancel(c.reason or "cancelled", grace)

    def fence(self, reason: str, grace: float, code: str = FENCED) -> int:
        """Stop every attempt for the node's sake; return how many were newly stopped.

        Their final reports fail with ``code`` — FENCED (out of contact; sent once contact is
        back) or DRAINED (the agent is shutting down) — and are retried elsewhere free of
        charge.
        """
        count = 0
        for att in self.attempts.values():
            if not att.cancelled.is_set():
                att.fence(reason, grace, code)
                count += 1
        return count

    def ack(self, ref: agent_pb2.AttemptRef) -> None:
        """The controller has the attempt's final report: forget it, remove it from the runtime."""
        self.reports.ack(ref)

    async def stop_all(self, grace: float, leave_running: bool = False) -> None:
        """Stop every attempt (agent shutdown).

        Args:
            grace: SIGTERM-to-SIGKILL grace period, seconds.
            leave_running: Let go of attempts without stopping them, for the next agent on
                this node to recover (only runtimes that keep work across agents, ``docker``).
        """
        tasks = [a.task for a in self.attempts.values() if a.task]
        if leave_running:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            self.attempts.clear()
            self.reports.persist(final=True)
            return
        stopping = set(self.attempts)
        for att in self.attempts.values():
            att.request_cancel("agent shutting down", grace)
        if tasks:
            await asyncio.wait(tasks, timeout=grace + 5)
        await self.reports.forget_cancelled(stopping)
        # For the next agent on this node, and so are any reports of attempts that end later.
        self.reports.persist(final=True)
        await self.reports.drain(timeout=5)

    async def recover(self) -> int:
        """Adopt the attempts a previous agent on this node left in the runtime.

        Call once, before the first connection to the controller. Running attempts are
        tracked as if this agent had started them (waited for, cancellable, timed out, and
        listed in ``Register.running``); ended ones become final reports at once (sent in
        ``Register.pending_reports``). The controller adopts current attempts and has stale
        ones stopped. Returns how many attempts were found.
        """
        found = await self.runtime.recover()

        def known(key: Key) -> bool:
            return key in self.attempts or key in self.reports

        for f in found_attempts(found, known):
            att = Attempt(ref=f.ref, handle=f.task.handle)
            key = key_of(f.ref)
            if f.task.running:
                self.attempts[key] = att
                att.task = asyncio.create_task(self._run_recovered(att, f), name=f"adopt {key}")
            else:
                await self._run_recovered(att, f)
        return len(found)

    def _dir(self, ref: agent_pb2.AttemptRef, att: Attempt | None = None) -> str:
        # layout.attempt_dir's path, built in one go and once per attempt (as a string: a
        # Path's parsing and joins cost more than the system calls that use it).
        if att is not None and att.dir is not None:
            return att.dir
        d = f"{self._work_dir}/{ref.run_id}/{ref.task}/{ref.attempt}"
        if att is not None:
            att.dir = d
        return d

    async def _run(self, att: Attempt, a: agent_pb2.AssignTask) -> None:
        status = agent_pb2.TaskStatus(ref=a.ref)
        await self._traced(
            att,
            status,
            f"run {a.spec.name}",
            a.spec.name,
            a.traceparent,
            lambda traceparent: self._execute(att, a, status, traceparent),
            "attempt failed in the agent",
        )

    async def _run_recovered(self, att: Attempt, f: Found) -> None:
        d = self._dir(f.ref)
        saved = saved_status(d, f.ref) if not f.task.running else None
        if saved is not None:
            # The previous agent had finished this attempt; only its report was not acked.
            self._conclude(att, saved, d, on_disk=True)
            return
        status = f.initial_status()
        attempt_span = self._attempt_span_again(f, status)
        await self._traced(
            att,
            status,
            f"recover {f.ref.task}",
            f.ref.task,
            traceparent_of(attempt_span) if attempt_span is not None else f.traceparent,
            lambda _traceparent: self._supervise(att, status, f.timeout, f.elapsed),
            "recovered attempt failed in the agent",
        )
        if attempt_span is not None:
            _end_span(attempt_span, status)
            attempt_span.end()

    def _attempt_span_again(self, f: Found, status: agent_pb2.TaskStatus) -> trace.Span | None:
        """The adopted attempt's own span, recorded under the id the agent that started it
        gave it (the task's spans name it as their parent): that agent never exports it
        when it hands the attempt over, and cannot when it crashed. None when spans are not
        exported, or the labels predate the dispatch label."""
        if not self.step_spans or not f.dispatch:
            return None
        own = parse_traceparent(f.traceparent)
        if own is None:
            return None
        start = status.started_at.ToNanoseconds() if status.HasField("started_at") else None
        with fixed_span_ids(own.trace_id, own.span_id):
            return self.tracer.start_span(
                f"run {f.ref.task}",
                context=context_from_traceparent(f.dispatch),
                kind=trace.SpanKind.CONSUMER,
                start_time=start,
                attributes={
                    "tether.run_id": f.ref.run_id,
                    "tether.task": f.ref.task,
                    "tether.attempt": f.ref.attempt,
                    "tether.runtime": self.runtime.name,
                },
            )

    async def _traced(
        self,
        att: Attempt,
        status: agent_pb2.TaskStatus,
        span_name: str,
        task: str,
        traceparent: str,
        body: Callable[[str], Awaitable[None]],
        failure: str,
    ) -> None:
        """Run ``body`` in the attempt's span (when spans are exported), then conclude with
        ``status``. ``body`` gets the ``traceparent`` that names the attempt's span (exported
        or not), for the task.

        An exception in the agent itself (not in the task) is the attempt's result: it
        fails with ``runtime_error`` rather than being left running forever unreported.
        """
        ref = att.ref
        if self.step_spans:
            # Ended below, not by the block: an attempt handed over to the next agent
            # (--leave-running: this task is cancelled) must not be exported as over; the
            # agent that adopts it records it (_attempt_span_again).
            cm = self.tracer.start_as_current_span(
                span_name,
                context=context_from_traceparent(traceparent),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "tether.run_id": ref.run_id,
                    "tether.task": task,
                    "tether.attempt": ref.attempt,
                    "tether.runtime": self.runtime.name,
                },
                end_on_exit=False,
            )
        else:
            # Nothing would export it: no span, only its ids in the task's TRACEPARENT,
            # instead of one recorded for nobody (a sixth of the agent's CPU per no-op
            # attempt) or a span object that only carries the ids.
            cm = _NO_SPAN
        with cm as span:
            try:
                await body(traceparent_of(span) if span is not None else _child_of(traceparent))
            except Exception as e:
                log.exception(failure, task=task)
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = "runtime_error"
                status.message = f"agent error: {e}"
            _end_span(span, status)
            if span is not None:
                span.end()
        self._conclude(att, status, self._dir(ref, att))

    def _conclude(
        self, att: Attempt, status: agent_pb2.TaskStatus, d: str, on_disk: bool = False
    ) -> None:
        """Keep the final report until acknowledged, then send it (``on_disk``: read from
        ``d``, kept there by a previous agent)."""
        self._count(status)
        self.reports.keep(status, att.handle, d, on_disk)
        self.attempts.pop(key_of(att.ref), None)
        self.report(status)

    def _count(self, status: agent_pb2.TaskStatus) -> None:
        """Count the finished attempt by outcome: its state, or why it failed."""
        if status.state == _FAILED and status.reason:
            outcome = status.reason
        else:
            outcome = _OUTCOMES.get(status.state) or str(status.state)
        seconds = None
        if status.HasField("started_at") and status.HasField("finished_at"):
            ns = status.finished_at.ToNanoseconds() - status.started_at.ToNanoseconds()
            seconds = ns / 1e9
        self.metrics.attempt_finished(outcome, seconds)
        if status.reason in _RUNTIME_REASONS:
            self.metrics.runtime_error(status.reason)

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        """A step of the current attempt as a child span of its run span (when spans are
        exported: steps are leaves nothing else reads, four of them per attempt)."""
        if not self.step_spans:
            return _NO_PHASE
        return self.tracer.start_as_current_span(name)

    async def _execute(
        self, att: Attempt, a: agent_pb2.AssignTask, status: agent_pb2.TaskStatus, traceparent: str
    ) -> None:
        ref = a.ref
        d = self._dir(ref, att)
        with self._phase("stage"):
            launch.stage(d, a)
        spec = launch.launch_spec(
            a,
            d,
            node=self.config.node,
            traceparent=traceparent,
            task_path=self.runtime.task_path,
            log_limit_bytes=self.config.log_limit_bytes,
            on_event=lambda kind, message: self.event(ref, kind, message),
            phase=self._phase,
        )
        status.started_at.CopyFrom(now())
        began = time.perf_counter()
        try:
            with self._phase(f"{self.runtime.name} start"):
                att.handle = await self.runtime.start(spec)
        except RuntimeError_ as e:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason, status.message, status.exit_code = e.reason, str(e), -1
            launch.redact(status, a.secret_env.values())
            return
        self.started_count += 1
        self.metrics.started(time.perf_counter() - began)
        self.report(agent_pb2.TaskStatus(ref=ref, state=_RUNNING, started_at=status.started_at))
        try:
            await self._supervise(att, status, launch.timeout_of(a.spec), 0.0)
        finally:
            launch.redact(status, a.secret_env.values())

    async def _supervise(
        self, att: Attempt, status: agent_pb2.TaskStatus, timeout: float, elapsed: float
    ) -> None:
        await supervise(
            att,
            status,
            timeout=timeout,
            elapsed=elapsed,
            stop_grace=self.config.stop_grace,
            d=self._dir(att.ref, att),
            phase=self._phase,
        )


def _child_of(traceparent: str) -> str:
    """The ``traceparent`` of a new (unrecorded) span in ``traceparent``'s trace, or in a new
    trace when it names none."""
    parent = _PARENTS.get(traceparent)
    if parent is None:
        ctx = parse_traceparent(traceparent) if traceparent else None
        if ctx is None:
            return f"00-{_IDS.generate_trace_id():032x}-{_IDS.generate_span_id():016x}-01"
        parent = (f"00-{ctx.trace_id:032x}-", f"-{ctx.trace_flags:02x}")
        if len(_PARENTS) >= 1024:  # the runs of long ago: start afresh
            _PARENTS.clear()
        _PARENTS[traceparent] = parent
    return f"{parent[0]}{_IDS.generate_span_id():016x}{parent[1]}"


def _end_span(span: trace.Span | None, status: agent_pb2.TaskStatus) -> None:
    if not status.HasField("finished_at"):
        status.finished_at.CopyFrom(now())
    if span is None or not span.is_recording():
        return
    span.set_attribute("tether.state", _STATE_NAMES.get(status.state, str(status.state)))
    span.set_attribute("tether.exit_code", status.exit_code)
    if status.state != _SUCCEEDED:
        span.set_status(trace.Status(trace.StatusCode.ERROR, status.reason))
