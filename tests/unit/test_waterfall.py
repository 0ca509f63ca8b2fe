"""``tether trace``'s timeline, from a run's records alone."""

from __future__ import annotations

import json

import pytest
from google.protobuf import timestamp_pb2

from tether.api.v1 import types_pb2 as t
from tether.sdk.waterfall import render, timeline, trace_id_of, trace_url

S, R = t.TaskState, t.RunState
T0 = 1_000_000.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def ts(offset: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int((T0 + offset) * 1e9))
    return out


def attempt(task: t.TaskRun, number, node, state, scheduled, started, finished, reason=""):
    task.attempts.add(
        number=number,
        node=node,
        state=state,
        scheduled_at=ts(scheduled),
        started_at=ts(started),
        finished_at=ts(finished),
        reason=reason,
    )


def sample_run() -> t.Run:
    run = t.Run(
        id="01a2",
        workflow_name="wf",
        state=R.RUN_STATE_SUCCEEDED,
        created_at=ts(0),
        started_at=ts(0.1),
        finished_at=ts(10),
        traceparent=f"00-{TRACE}-00f067aa0ba902b7-01",
    )
    a = run.tasks.add(spec=t.TaskSpec(name="a"), index=0, attempt=2, finished_at=ts(4))
    attempt(a, 1, "n1", S.TASK_STATE_FAILED, 0.1, 0.2, 1.0, "exit_code")
    attempt(a, 2, "n2", S.TASK_STATE_SUCCEEDED, 2.0, 2.5, 4.0)
    b = run.tasks.add(spec=t.TaskSpec(name="b", depends_on=["a", "c"]), index=1, finished_at=ts(10))
    attempt(b, 1, "n1", S.TASK_STATE_SUCCEEDED, 4.5, 5.0, 10.0)
    c = run.tasks.add(spec=t.TaskSpec(name="c"), index=2, finished_at=ts(3))
    attempt(c, 1, "n2", S.TASK_STATE_SUCCEEDED, 0.1, 0.3, 3.0)
    return run


def test_timeline_splits_each_attempt_and_finds_the_critical_path():
    tl = timeline(sample_run())
    assert tl.duration == pytest.approx(10)
    assert tl.queue_wait == pytest.approx(0.1)
    assert tl.trace_id == TRACE
    assert tl.critical_path == ["a", "b"]
    rows = {(b.task, b.attempt): b for b in tl.attempts}
    a1, a2, b1, c1 = rows["a", 1], rows["a", 2], rows["b", 1], rows["c", 1]
    assert (a1.wait, a1.start, a1.run) == pytest.approx((0.1, 0.1, 0.8))
    # A retry waits from its previous attempt's end (the backoff is part of its wait).
    assert a2.ready == pytest.approx(1.0) and a2.wait == pytest.approx(1.0)
    # A downstream task is ready when its last upstream task ended.
    assert b1.ready == pytest.approx(4.0) and b1.wait == pytest.approx(0.5)
    assert (a1.critical, a2.critical, b1.critical, c1.critical) == (True, True, True, False)
    data = json.loads(json.dumps(tl.as_dict()))
    assert data["attempts"][0]["run"] == pytest.approx(0.8)


def test_render_draws_one_row_per_attempt_marking_the_critical_path():
    text = render(timeline(sample_run()), width=100, trace_link=f"http://j/trace/{TRACE}")
    lines = text.splitlines()
    assert lines[0] == "run 01a2 (wf) SUCCEEDED in 10s"
    assert lines[1] == f"trace {TRACE}  http://j/trace/{TRACE}"
    rows = [line for line in lines if "|" in line][1:]
    assert [r.split()[:2] for r in rows] == [
        ["*", "a#1"],
        ["*", "a#2"],
        ["*", "b#1"],
        ["c#1", "n2"],
    ]
    assert all(len(r) <= 100 for r in lines)
    bar_b = rows[2].split("|")[1]
    # b waits from 40% of the run, starts at 45%, runs from 50% to the end.
    assert bar_b.index("·") == int(0.4 * len(bar_b))
    assert bar_b.rstrip().endswith("█") and bar_b.index("█") == int(0.5 * len(bar_b))
    assert "▓" in rows[0]  # the failed attempt


def test_an_unfinished_run_is_drawn_up_to_now():
    run = sample_run()
    run.ClearField("finished_at")
    run.state = R.RUN_STATE_RUNNING
    run.tasks[1].ClearField("finished_at")
    run.tasks[1].attempts[0].ClearField("finished_at")
    tl = timeline(run, now_ns=int((T0 + 20) * 1e9))
    assert tl.duration == pytest.approx(20) and not tl.finished
    assert tl.critical_path == ["a"]
    assert "running for 20s" in render(tl)


def test_trace_ids_and_links():
    assert trace_id_of(f"00-{TRACE}-00f067aa0ba902b7-01") == TRACE
    assert trace_id_of("") == trace_id_of("garbage") == ""
    assert trace_url(TRACE, "http://jaeger:16686/trace/{trace_id}") == (
        f"http://jaeger:16686/trace/{TRACE}"
    )
    assert trace_url(TRACE, "") == ""
