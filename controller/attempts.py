"""Attempts: what agents report about them (fenced by attempt number), results, retries, and
attempts lost with their node.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from google.protobuf import timestamp_pb2
from opentelemetry import trace

from tether.api.v1 import agent_pb2, types_pb2
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.committer import Committer
from tether.controller.config import ControllerConfig
from tether.controller.dispatch import Dispatch
from tether.controller.durations import Durations
from tether.controller.metrics import Metrics
from tether.controller.progress import Progress
from tether.controller.records import AgentSession, RunEntry, TaskEntry, now
from tether.controller.retry import retry_delay
from tether.controller.secrets import SecretUnavailable
from tether.controller.timers import Timers
from tether.sdk.constants import DEFAULT_PRIORITY, LOG_TAIL_BYTES, MAX_OUTPUT_BYTES
from tether.sdk.redaction import redact_text
from tether.sdk.states import DRAINED, FENCED, FINAL_REPORT_STATES
from tether.sdk.telemetry import context_from_traceparent, exports_spans, get_logger

__all__ = ["Attempts"]

log = get_logger("controller.engine")

_MAX_EVENTS = 50


class Attempts:
    """Applies agents' reports to the current attempt of each task, and retries or loses it."""

    def __init__(
        self,
        config: ControllerConfig,
        tracer: trace.Tracer,
        cache: Cache,
        committer: Committer,
        metrics: Metrics,
        dispatch: Dispatch,
        progress: Progress,
        timers: Timers,
    ) -> None:
        self.config = config
        self.tracer = tracer
        # Its per-attempt spans are leaves nothing reads but a trace viewer: made only when
        # spans are exported (they cost a tenth of the controller's CPU per task).
        self.spans = exports_spans()
        self.cache = cache
        self.committer = committer
        self.metrics = metrics
        self.dispatch = dispatch
        self.progress = progress
        self.timers = timers
        # Learns how long tasks take (critical-path); set by the engine.
        self.durations: Durations | None = None

    def on_event(self, session: AgentSession, report: agent_pb2.TaskEventReport) -> None:
        """Record an event of the current attempt (older attempts' events are dropped)."""
        _, e = self.cache.task(report.ref.run_id, report.ref.task)
        if e is None or e.msg.attempt != report.ref.attempt:
            return
        if not gangs.is_on(e.msg, session.node):
            return
        e.msg.events.append(report.event)
        if len(e.msg.events) > _MAX_EVENTS:
            del e.msg.events[: len(e.msg.events) - _MAX_EVENTS]
        self.committer.mark(e)

    def on_status(self, session: AgentSession, s: agent_pb2.TaskStatus) -> None:
        """Apply an agent's report about one attempt, fenced by the attempt number."""
        if s.ref.run_id in self.cache.reloading:
            return  # neither ack nor kill on a half-loaded run: the agent reports again
        run, e = self.cache.task(s.ref.run_id, s.ref.task)
        final = s.state in FINAL_REPORT_STATES
        stale = (
            e is None
            or s.ref.attempt != e.msg.attempt
            or not gangs.is_on(e.msg, session.node)
            or e.msg.state not in lc.TASK_ACTIVE
        )
        if stale:
            if final:  # a stale attempt ended: what it held on the node is free again
                self.cache.release_stale(session.node, (s.ref.run_id, s.ref.task, s.ref.attempt))
            if final and e is not None:
                # Acknowledge only once what this attempt's record says is in etcd: the
                # result may still be on its way there (a resent report overtaking its write).
                self.committer.when_written(e, self.dispatch.acker(session, s.ref))
            elif final:
                self.dispatch.ack(session, s.ref)
            else:
                self.dispatch.cancel(
                    session, s.ref.run_id, s.ref.task, s.ref.attempt, "stale attempt"
                )
            return
        assert run is not None and e is not None
        if final and e.msg.preempted_by and s.state != lc.SUCCEEDED:
            self.preempted(run, e)
            self.committer.when_written(e, self.dispatch.acker(session, s.ref))
            return
        if final and s.reason in (FENCED, DRAINED):
            # The agent lost contact for longer than its grace and stopped the attempt itself:
            # the node's fault, not the task's, so retried without using up `retries`.
            self.lose(run, e, s.message or "stopped by its agent out of contact")
            self.committer.when_written(e, self.dispatch.acker(session, s.ref))
            return
        if s.state == lc.RUNNING:
            if gangs.is_gang(e.msg):
                rep = gangs.replica_on(e.msg, session.node)
                if rep is not None and rep.state == lc.SCHEDULED:
                    rep.state = lc.RUNNING
                    self.committer.mark(e)
            self.mark_running(e, s)
            return
        if not final:
            log.warning("ignoring report", state=s.state, task=s.ref.task)
            return
        if gangs.is_gang(e.msg) and not self._gang_done(e, s, session):
            return
        self._record_result(run, e, s, session)

    def _gang_done(self, e: TaskEntry, s: agent_pb2.TaskStatus, session: AgentSession) -> bool:
        """Record one replica's end; True when the gang's attempt is over with this report
        (every replica succeeded, or this one did not: the others are then stopped)."""
        m = e.msg
        rep = gangs.replica_on(m, session.node)
        assert rep is not None
        rep.state = s.state
        rep.exit_code = s.exit_code
        if s.state == lc.SUCCEEDED:
            if rep.index == 0:
                m.outputs_json = s.outputs_json  # the gang's output is replica 0's
            if all(r.state == lc.SUCCEEDED for r in m.replicas):
                s.outputs_json = m.outputs_json
                return True
            self.committer.when_written(e, self.dispatch.acker(session, s.ref))
            self.committer.mark(e)
            return False
        s.message = f"replica {rep.index} on {rep.node}: {s.message or s.reason}"
        self.dispatch.cancel_everywhere(
            e, f"gang: replica {rep.index} ended {lc.task_state_name(s.state)}", but=session.node
        )
        return True

    def unstartable(self, session: AgentSession, ref: agent_pb2.AttemptRef, why: str) -> None:
        """The controller cannot send the attempt (say, its secret was deleted): it fails
        as one its agent could not start would, and is retried as such."""
        self.on_status(
            session,
            agent_pb2.TaskStatus(
                ref=ref,
                state=lc.FAILED,
                exit_code=-1,
                reason="runtime_error",
                message=why,
                finished_at=now(),
            ),
        )

    def mark_running(self, e: TaskEntry, s: agent_pb2.TaskStatus | None) -> None:
        """The agent started the attempt (``s``: its report; None: it listed it as running)."""
        if e.msg.state != lc.SCHEDULED:
            return
        lc.move_task(e.msg, lc.RUNNING)
        started = s.started_at if s and s.HasField("started_at") else now()
        e.msg.started_at.CopyFrom(started)
        if e.msg.attempts:
            lc.move_attempt(e.msg, e.msg.attempts[-1], lc.RUNNING)
            e.msg.attempts[-1].started_at.CopyFrom(started)
        self.committer.mark(e)

    def _redact(self, m: types_pb2.TaskRun, s: agent_pb2.TaskStatus) -> None:
        """Mask the task's secret values in what its report shows, before it is stored.

        The agent masks them too, but one that adopted the attempt after a restart no longer
        knows them, and an older agent may not.
        """
        secrets = self.dispatch.secrets
        try:
            values = list(secrets.resolve(m.spec).values()) if secrets is not None else []
        except SecretUnavailable as e:  # deleted since: what the agent masked must do
            log.warning("cannot mask a report's secrets", task=m.spec.name, error=str(e))
            return
        # The tails as they will be stored (cut to their last LOG_TAIL_BYTES), masked after
        # the cut: it may fall inside a value.
        s.stdout_tail = redact_text(s.stdout_tail[-LOG_TAIL_BYTES:], values)
        s.stderr_tail = redact_text(s.stderr_tail[-LOG_TAIL_BYTES:], values)
        s.message = redact_text(s.message, values)

    def _record_result(
        self, run: RunEntry, e: TaskEntry, s: agent_pb2.TaskStatus, session: AgentSession
    ) -> None:
        m = e.msg
        att = m.attempts[-1] if m.attempts else m.attempts.add(number=m.attempt)
        lc.move_attempt(m, att, s.state)
        if m.spec.env_secrets:
            self._redact(m, s)
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
        m.stdout_tail = s.stdout_tail[-LOG_TAIL_BYTES:]
        m.stderr_tail = s.stderr_tail[-LOG_TAIL_BYTES:]
        self.cache.account(e, -1)
        span_cm = (
            self.tracer.start_as_current_span(
                f"record {m.spec.name}",
                context=context_from_traceparent(m.traceparent),
                attributes={
                    "tether.run_id": run.msg.id,
                    "tether.task": m.spec.name,
                    "tether.attempt": m.attempt,
                    "tether.state": lc.task_state_name(s.state),
                    "tether.exit_code": s.exit_code,
                },
            )
            if self.spans
            else contextlib.nullcontext()
        )
        with span_cm:
            ack = self.dispatch.acker(session, s.ref)
            if s.state == lc.SUCCEEDED:
                if len(s.outputs_json) > MAX_OUTPUT_BYTES:
                    lc.move_attempt(m, att, lc.FAILED)
                    att.reason = m.reason = "output"
                    m.message = att.message = f"output larger than {MAX_OUTPUT_BYTES} bytes"
                    self._fail_or_retry(run, e, ack)
                    return
                m.outputs_json = s.outputs_json
                m.finished_at.CopyFrom(finished)
                if self.durations is not None and att.HasField("started_at"):
                    took = (finished.ToNanoseconds() - att.started_at.ToNanoseconds()) / 1e9
                    self.durations.observe(run.msg.workflow_name, m.spec.name, took)
                self.progress.finish_task(run, e, lc.SUCCEEDED, ack)
            elif s.state == lc.CANCELLED or m.cancel_requested:
                m.finished_at.CopyFrom(finished)
                self.progress.finish_task(run, e, lc.CANCELLED, ack)
            else:
                self._fail_or_retry(run, e, ack)

    def _fail_or_retry(self, run: RunEntry, e: TaskEntry, ack: Callable[[], None] | None) -> None:
        m = e.msg
        failures = m.attempt - m.lost_attempts - m.preempted_attempts
        if failures <= m.spec.retries and not m.cancel_requested:
            delay = retry_delay(m.spec, failures, self.config)
            lc.move_task(m, lc.RETRYING)
            nb = timestamp_pb2.Timestamp()
            nb.FromNanoseconds(int((time.time() + delay) * 1e9))
            m.not_before.CopyFrom(nb)
            self.committer.mark(e, ack)
            self.arm_retry(run, e, delay)
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
            self.progress.finish_task(run, e, lc.FAILED, ack)

    def arm_retry(self, run: RunEntry, e: TaskEntry, delay: float) -> None:
        """Ready a RETRYING or LOST task again after ``delay`` seconds."""
        key = (run.msg.id, e.msg.spec.name)
        self.timers.arm(key, delay, lambda: self._retry_due(key))

    def _retry_due(self, key: tuple[str, str]) -> None:
        run, e = self.cache.task(*key)
        if run is None or e is None or e.msg.state not in (lc.RETRYING, lc.LOST, lc.PREEMPTED):
            return
        self.progress.ready_again(run, e)

    def preempted(self, run: RunEntry, e: TaskEntry) -> None:
        """The attempt was stopped for a task of higher priority: PREEMPTED, then READY
        again at once, not counted against ``retries``; its message says by whom."""
        m = e.msg
        by = m.preempted_by
        run_id, _, task = by.partition("/")
        _, by_e = self.cache.task(run_id, task)
        prio = (
            by_e.msg.spec.priority
            if by_e is not None and by_e.msg.spec.HasField("priority")
            else DEFAULT_PRIORITY
        )
        why = f"preempted by {task} of run {run_id} (priority {prio})"
        self.cache.account(e, -1)
        _end_attempt(m, lc.PREEMPTED, "preempted", why)
        m.preempted_by = ""
        if m.cancel_requested:
            lc.move_task(m, lc.CANCELLED)
            m.finished_at.CopyFrom(now())
            self.progress.finish_task(run, e, lc.CANCELLED, already_moved=True)
            return
        lc.move_task(m, lc.PREEMPTED)
        m.preempted_attempts += 1
        self.metrics.attempts_preempted.inc()
        log.info("attempt preempted", run_id=run.msg.id, task=m.spec.name, by=by)
        self.progress.ready_again(run, e)

    def lose(self, run: RunEntry, e: TaskEntry, why: str, delay: float = 0.0) -> None:
        """The attempt's node is gone: LOST, then READY again (not counted as a failure)
        after ``delay`` seconds (while the lost node may still be stopping the attempt).
        The other replicas of a gang are stopped: the gang is retried whole."""
        m = e.msg
        if gangs.is_gang(m):
            self.dispatch.cancel_everywhere(e, f"gang: {why}")
        self.cache.account(e, -1)
        _end_attempt(m, lc.LOST, "node_lost", why)
        m.preempted_by = ""  # a preemption not yet carried out ends with the attempt
        if m.cancel_requested:
            lc.move_task(m, lc.CANCELLED)
            m.finished_at.CopyFrom(now())
            self.progress.finish_task(run, e, lc.CANCELLED, already_moved=True)
            return
        lc.move_task(m, lc.LOST)
        m.lost_attempts += 1
        self.metrics.attempts_lost.inc()
        self.committer.mark(e)
        if delay > 0:
            nb = timestamp_pb2.Timestamp()
            nb.FromNanoseconds(int((time.time() + delay) * 1e9))
            m.not_before.CopyFrom(nb)
        log.warning("attempt lost", run_id=run.msg.id, task=m.spec.name, attempt=m.attempt, why=why)
        self.arm_retry(run, e, delay)

    def expire_orphans(self, orphans: set[tuple[str, str]]) -> None:
        """Lose the attempts whose nodes did not come back within a lease TTL of a start."""
        for run_id, name in orphans:
            run, e = self.cache.task(run_id, name)
            if run is None or e is None or e.msg.state not in lc.TASK_ACTIVE:
                continue
            node = self.cache.nodes.get(e.msg.node)
            if node is None or node.session is None:
                self.lose(run, e, f"node {e.msg.node} did not come back")


def _end_attempt(m: types_pb2.TaskRun, state: int, reason: str, why: str) -> None:
    """End the task's current attempt (if any) with ``state``, and give the task its reason."""
    if m.attempts:
        att = m.attempts[-1]
        lc.move_attempt(m, att, state)
        att.reason, att.message = reason, why
        att.finished_at.CopyFrom(now())
    m.reason, m.message = reason, why
