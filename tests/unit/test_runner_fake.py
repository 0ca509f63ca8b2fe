"""The runner's start path on the shared fake runtime: reports, timeout, cancel, start errors."""

from __future__ import annotations

import asyncio

import pytest
from fake_runtime import FakeRuntime
from google.protobuf import duration_pb2
from opentelemetry import trace

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runner import Runner
from tether.agent.runtimes.base import ExitStatus, RuntimeError_
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t

S = t.TaskState
REF = agent_pb2.AttemptRef(run_id="run1", task="t", attempt=1)


def assign(timeout: int = 0) -> agent_pb2.AssignTask:
    spec = t.TaskSpec(name="t", command=["true"])
    if timeout:
        spec.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout))
    return agent_pb2.AssignTask(ref=REF, spec=spec)


def run(tmp_path, runtime: FakeRuntime, act=None):
    async def go():
        reports: list[agent_pb2.TaskStatus] = []
        runner = Runner(
            AgentConfig(node="n1", work_dir=tmp_path, stop_grace=0.5),
            runtime,
            trace.get_tracer("test"),
            reports.append,
        )
        runner.assign(assign(timeout=1 if act == "timeout" else 0))
        task = runner.attempts[("run1", "t", 1)].task
        if act == "cancel":
            while not runtime.handles:
                await asyncio.sleep(0.01)
            runner.cancel(
                agent_pb2.CancelTask(ref=REF, reason="user", grace=duration_pb2.Duration(seconds=2))
            )
        await asyncio.wait_for(task, 5)
        return reports, runner

    return asyncio.run(go())


def test_a_started_attempt_reports_running_then_its_result(tmp_path):
    runtime = FakeRuntime(exit_status=ExitStatus(0))
    reports, runner = run(tmp_path, runtime)
    assert [r.state for r in reports] == [S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert runtime.started[0].labels[layout.NODE_LABEL] == "n1"
    assert runner.pending_reports() == [reports[-1]]
    d = layout.attempt_dir(tmp_path, "run1", "t", 1)
    assert not (d / layout.STATUS_FILE).exists()  # until unacknowledged for a while
    runner.reports.persist()
    assert agent_pb2.TaskStatus.FromString((d / layout.STATUS_FILE).read_bytes()) == reports[-1]


def test_an_attempt_that_cannot_start_fails_with_the_runtime_reason(tmp_path):
    runtime = FakeRuntime(start_error=RuntimeError_("no such image", reason="image"))
    reports, _ = run(tmp_path, runtime)
    assert [(r.state, r.reason, r.exit_code) for r in reports] == [
        (S.TASK_STATE_FAILED, "image", -1)
    ]


def test_timeout_stops_with_the_stop_grace_and_cancel_with_its_own(tmp_path):
    timed_out = FakeRuntime()
    reports, _ = run(tmp_path / "a", timed_out, act="timeout")
    assert (reports[-1].state, reports[-1].reason) == (S.TASK_STATE_FAILED, "timeout")
    assert timed_out.handles[0].stopped_with == 0.5
    cancelled = FakeRuntime()
    reports, _ = run(tmp_path / "b", cancelled, act="cancel")
    assert (reports[-1].state, reports[-1].message) == (S.TASK_STATE_CANCELLED, "user")
    assert cancelled.handles[0].stopped_with == 2.0


def test_a_draining_runner_hands_assignments_back_unstarted(tmp_path):
    async def go():
        reports: list[agent_pb2.TaskStatus] = []
        runtime = FakeRuntime(exit_status=ExitStatus(0))
        runner = Runner(
            AgentConfig(node="n1", work_dir=tmp_path),
            runtime,
            trace.get_tracer("t"),
            reports.append,
        )
        runner.refusing = "node n1 is shutting down"
        runner.assign(assign())
        return reports, runner, runtime

    reports, runner, runtime = asyncio.run(go())
    assert runtime.started == [] and runner.attempts == {}
    (report,) = reports
    assert report.state == S.TASK_STATE_FAILED and report.reason == "drained"
    assert report.message == "node n1 is shutting down"
    assert runner.pending_reports() == [report]  # kept until the controller acknowledges it


def test_the_runner_counts_attempts_by_outcome_and_times_their_start(tmp_path):
    _, ok = run(tmp_path / "ok", FakeRuntime(exit_status=ExitStatus(0)))
    _, bad = run(tmp_path / "bad", FakeRuntime(start_error=RuntimeError_("no engine", "image")))
    _, slow = run(tmp_path / "slow", FakeRuntime(exit_status=None), act="timeout")

    def sample(runner, name, **labels):
        return runner.metrics.registry.get_sample_value(name, {"node": "n1", **labels})

    finished = "tether_agent_attempts_finished_total"
    assert sample(ok, finished, outcome="succeeded") == 1
    assert sample(ok, "tether_agent_start_duration_seconds_count", runtime="fake") == 1
    assert sample(bad, finished, outcome="image") == 1
    assert sample(bad, "tether_agent_runtime_errors_total", runtime="fake", reason="image") == 1
    assert sample(bad, "tether_agent_start_duration_seconds_count", runtime="fake") is None
    assert sample(slow, finished, outcome="timeout") == 1
    assert sample(slow, "tether_agent_attempt_duration_seconds_count", outcome="timeout") == 1
    assert sample(slow, "tether_agent_attempts_running") == 0


def test_metrics_listen_must_be_host_and_port(tmp_path):
    with pytest.raises(ValueError, match="metrics_listen"):
        AgentConfig(work_dir=tmp_path, metrics_listen="nowhere")
    assert AgentConfig(work_dir=tmp_path, metrics_listen="127.0.0.1:0").metrics_listen


@pytest.mark.parametrize(
    ("requeue", "state", "reason"),
    [(False, S.TASK_STATE_CANCELLED, ""), (True, S.TASK_STATE_FAILED, "drained")],
)
def test_an_attempt_cancelled_before_its_assignment_arrives_never_starts(
    tmp_path, requeue, state, reason
):
    """A drain's deadline can fall between a bind and the agent getting the assignment: the
    cancel comes first, and the assignment after it must not run."""

    async def go():
        reports: list[agent_pb2.TaskStatus] = []
        runtime = FakeRuntime(exit_status=ExitStatus(0))
        runner = Runner(
            AgentConfig(node="n1", work_dir=tmp_path),
            runtime,
            trace.get_tracer("t"),
            reports.append,
        )
        runner.cancel(agent_pb2.CancelTask(ref=REF, reason="node n1 drained", requeue=requeue))
        runner.assign(assign())
        await asyncio.sleep(0.05)
        return reports, runtime

    reports, runtime = asyncio.run(go())
    assert runtime.started == []
    assert [(r.state, r.reason, r.message) for r in reports] == [(state, reason, "node n1 drained")]
