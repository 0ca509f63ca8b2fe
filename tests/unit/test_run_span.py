"""The run's span, recorded at the run's end with the ids and times stored at submit."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags, set_span_in_context
from opentelemetry.trace.span import NonRecordingSpan

from tether.api.v1 import types_pb2 as t
from tether.controller.run_span import new_run_trace, parse_traceparent, record_run_span
from tether.sdk.telemetry import context_from_traceparent, make_tracer_provider

S, R = t.TaskState, t.RunState


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def tracer_and_spans():
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("test")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_a_new_run_trace_is_a_root_or_the_callers_child():
    root = parse_traceparent(new_run_trace(None))
    assert root is not None and root[2] == 1  # sampled
    caller = SpanContext(0xABC, 0x42, is_remote=True, trace_flags=TraceFlags(1))
    child = parse_traceparent(new_run_trace(set_span_in_context(NonRecordingSpan(caller))))
    assert child is not None
    assert child[0] == 0xABC and child[1] != 0x42
    assert parse_traceparent("00-zz-yy-01") is None
    assert parse_traceparent("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None


def test_the_run_span_has_the_stored_ids_times_and_events():
    tracer, exporter = tracer_and_spans()
    traceparent = new_run_trace(None)
    trace_id, span_id, _ = parse_traceparent(traceparent)
    run = t.Run(
        id="r1",
        workflow_name="wf",
        state=R.RUN_STATE_FAILED,
        created_at=ts(100),
        started_at=ts(100.5),
        finished_at=ts(130),
        task_count=1,
        traceparent=traceparent,
        run_span=True,
        message="task a failed",
    )
    task = t.TaskRun(spec=t.TaskSpec(name="a"), attempt=3, state=S.TASK_STATE_FAILED)
    task.attempts.add(
        number=1, node="n1", state=S.TASK_STATE_FAILED, finished_at=ts(110), reason="exit_code"
    )
    task.attempts.add(
        number=2, node="n2", state=S.TASK_STATE_LOST, finished_at=ts(120), reason="node_lost"
    )
    task.attempts.add(
        number=3, node="n1", state=S.TASK_STATE_FAILED, finished_at=ts(129), reason="exit_code"
    )
    # Recorded inside another span: that one must not become the run's parent.
    with tracer.start_as_current_span("record a"):
        assert record_run_span(tracer, run, [task])
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "run wf"]
    assert span.context.trace_id == trace_id
    assert span.context.span_id == span_id
    assert span.parent is None
    assert (span.start_time, span.end_time) == (100 * 10**9, 130 * 10**9)
    events = [(e.name, e.attributes["tether.attempt"], e.timestamp) for e in span.events]
    # The last failure ended the task: it is no retry.
    assert events == [("retry", 1, 110 * 10**9), ("node lost", 2, 120 * 10**9)]
    assert span.status.description == "task a failed"
    # Children started at submit from the stored traceparent are its children.
    child = tracer.start_span("dispatch a", context=context_from_traceparent(traceparent))
    assert child.parent.span_id == span_id and child.context.trace_id == trace_id


def test_a_run_with_a_caller_is_the_callers_child_and_old_runs_are_skipped():
    tracer, exporter = tracer_and_spans()
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    run = t.Run(
        workflow_name="wf",
        state=R.RUN_STATE_SUCCEEDED,
        created_at=ts(1),
        finished_at=ts(2),
        traceparent="00-" + "ab" * 16 + "-" + "ef" * 8 + "-01",
        parent_traceparent=parent,
        run_span=True,
    )
    assert record_run_span(tracer, run, [])
    (span,) = exporter.get_finished_spans()
    assert span.parent.span_id == int("cd" * 8, 16)
    assert not record_run_span(tracer, t.Run(workflow_name="new", run_span=True), [])
    # A run stored by an older controller: its traceparent is its submit span's, recorded.
    old = t.Run(workflow_name="old", traceparent=run.traceparent, finished_at=ts(2))
    assert not record_run_span(tracer, old, [])
    assert len(exporter.get_finished_spans()) == 1
