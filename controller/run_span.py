"""The run's span: the root of its trace, spanning the run from submit to its end.

Its ids are chosen at submit (:func:`new_run_trace`) and stored with the run, so that every
span about the run — submit, scheduling, dispatch, the agents' attempts, the task's own —
is its child even though the span itself is recorded only when the run ends
(:func:`record_run_span`), from the stored ``created_at`` to ``finished_at``. Whichever
controller leads when the run ends records it, so it survives restarts and leader changes.
"""

from __future__ import annotations

import random

from opentelemetry import trace
from opentelemetry.context import Context

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.sdk.telemetry import context_from_traceparent, fixed_span_ids

__all__ = ["new_run_trace", "parse_traceparent", "record_run_span"]

_SAMPLED = 0x01


def parse_traceparent(traceparent: str) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a W3C ``traceparent``, or None if it is not one."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def new_run_trace(parent: Context | None) -> str:
    """The ``traceparent`` of a new run's span: a child of ``parent``'s span if it has a
    valid one (a caller's trace), else the root of a new trace."""
    caller = trace.get_current_span(parent).get_span_context() if parent else None
    rng = random.SystemRandom()
    if caller is not None and caller.is_valid:
        trace_id, flags = caller.trace_id, int(caller.trace_flags)
    else:
        trace_id, flags = rng.getrandbits(128) or 1, _SAMPLED
    span_id = rng.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def _ns(ts) -> int:
    return ts.ToNanoseconds()


def record_run_span(tracer: trace.Tracer, run: t.Run, tasks: list[t.TaskRun]) -> bool:
    """Record the finished ``run``'s span with the ids chosen at submit; False if the run
    has none (stored before runs had spans: its ``traceparent`` is its submit span's).

    Retries and attempts lost with their node become the span's events, at the times the
    task records give.
    """
    ids = parse_traceparent(run.traceparent) if run.run_span else None
    if ids is None:
        return False
    trace_id, span_id, _flags = ids
    # An empty context, not the current one: the run ends inside some other span (the
    # record of its last task), which must not become its parent.
    parent = context_from_traceparent(run.parent_traceparent) or Context()
    final = run.state in lc.RUN_TERMINAL
    end = _ns(run.finished_at) if run.HasField("finished_at") else None
    with fixed_span_ids(trace_id, span_id):
        span = tracer.start_span(
            f"run {run.workflow_name}",
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            start_time=_ns(run.created_at),
            attributes={
                "tether.run_id": run.id,
                "tether.workflow": run.workflow_name,
                "tether.tasks": run.task_count,
                "tether.state": lc.run_state_name(run.state) if final else "",
                "tether.queue_wait_seconds": (
                    (_ns(run.started_at) - _ns(run.created_at)) / 1e9
                    if run.HasField("started_at")
                    else 0.0
                ),
            },
        )
    for task in sorted(tasks, key=lambda tk: tk.index):
        for att in task.attempts:
            if not att.HasField("finished_at"):
                continue
            attrs = {
                "tether.task": task.spec.name,
                "tether.attempt": att.number,
                "tether.node": att.node,
                "tether.reason": att.reason,
                "tether.message": att.message[:256],
            }
            if att.state == lc.LOST:
                span.add_event("node lost", attrs, timestamp=_ns(att.finished_at))
            elif att.state == lc.FAILED and att.number < task.attempt:
                span.add_event("retry", attrs, timestamp=_ns(att.finished_at))
    if run.state != lc.RUN_SUCCEEDED:
        span.set_status(trace.Status(trace.StatusCode.ERROR, run.message[:256] or "failed"))
    span.end(end_time=end)
    return True
