"""The runner's side of recovery and removal, with a fake runtime (no engine needed)."""

from __future__ import annotations

import asyncio
import json
import time

from fake_runtime import FakeHandle, FakeRuntime
from helpers import S
from opentelemetry import trace

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runner import Runner
from tether.agent.runtimes.base import ExitStatus, RecoveredTask
from tether.api.v1 import agent_pb2


def labels(task: str, attempt: int = 1, **extra: str) -> dict[str, str]:
    return {
        layout.RUN_LABEL: "run1",
        layout.TASK_LABEL: task,
        layout.ATTEMPT_LABEL: str(attempt),
        **extra,
    }


def make_runner(tmp_path, found):
    reports: list[agent_pb2.TaskStatus] = []
    runner = Runner(
        AgentConfig(node="n1", work_dir=tmp_path),
        FakeRuntime(found),
        trace.get_tracer("test"),
        reports.append,
    )
    return runner, reports


def test_ended_attempts_become_pending_reports_and_running_ones_are_tracked(tmp_path):
    async def go():
        d = layout.attempt_dir(tmp_path, "run1", "done", 1)
        d.mkdir(parents=True)
        (d / layout.OUTPUT_FILE).write_text(json.dumps({"x": 1}))
        (d / layout.STDOUT_FILE).write_text("hello\n")
        saved = agent_pb2.TaskStatus(
            ref=agent_pb2.AttemptRef(run_id="run1", task="cancelled", attempt=2),
            state=S.TASK_STATE_CANCELLED,
            reason="cancelled",
            message="cancelled by user",
        )
        sd = layout.attempt_dir(tmp_path, "run1", "cancelled", 2)
        sd.mkdir(parents=True)
        (sd / layout.STATUS_FILE).write_bytes(saved.SerializeToString())
        running = FakeHandle()
        found = [
            RecoveredTask(labels("done"), FakeHandle(ExitStatus(0)), running=False),
            RecoveredTask(labels("cancelled", 2), FakeHandle(ExitStatus(143)), running=False),
            RecoveredTask(labels("oom"), FakeHandle(ExitStatus(137, "oom", "oom!")), False),
            RecoveredTask(labels("busy"), running, running=True, started_at=time.time()),
            RecoveredTask({"no": "labels"}, FakeHandle(), running=True),
        ]
        runner, reports = make_runner(tmp_path, found)
        assert await runner.recover() == 5
        pending = {s.ref.task: s for s in runner.pending_reports()}
        refs = [r.task for r in runner.running_refs()]
        # The controller acknowledges the report of "done": its attempt is removed.
        runner.ack(pending["done"].ref)
        await asyncio.sleep(0)
        done_handle = found[0].handle
        running.finish(ExitStatus(0))
        await runner.attempts[("run1", "busy", 1)].task
        return pending, refs, done_handle, reports, runner

    pending, refs, done_handle, reports, runner = asyncio.run(go())
    assert set(pending) == {"done", "cancelled", "oom"}
    assert pending["done"].state == S.TASK_STATE_SUCCEEDED
    assert json.loads(pending["done"].outputs_json) == {"x": 1}
    assert pending["done"].stdout_tail == "hello\n"
    # The previous agent's own final report wins over what the exit code alone would say.
    assert pending["cancelled"].state == S.TASK_STATE_CANCELLED
    assert pending["cancelled"].message == "cancelled by user"
    assert (pending["oom"].state, pending["oom"].reason) == (S.TASK_STATE_FAILED, "oom")
    assert refs == ["busy"]
    assert done_handle.removed == 1
    assert reports[-1].ref.task == "busy" and reports[-1].state == S.TASK_STATE_SUCCEEDED
    assert {s.ref.task for s in runner.pending_reports()} == {"cancelled", "oom", "busy"}
    assert runner.runtime.started == []  # recovery starts nothing


def test_recovered_attempt_honours_cancel_and_its_timeout(tmp_path):
    async def go():
        cancel_me, overdue = FakeHandle(), FakeHandle()
        found = [
            RecoveredTask(labels("cancel-me"), cancel_me, started_at=time.time()),
            RecoveredTask(
                labels("overdue", **{layout.TIMEOUT_LABEL: "5"}),
                overdue,
                started_at=time.time() - 10,
            ),
        ]
        runner, _ = make_runner(tmp_path, found)
        await runner.recover()
        tasks = [a.task for a in runner.attempts.values()]
        runner.cancel(
            agent_pb2.CancelTask(
                ref=agent_pb2.AttemptRef(run_id="run1", task="cancel-me", attempt=1),
                reason="stale attempt",
            )
        )
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return {s.ref.task: s for s in runner.pending_reports()}, cancel_me, overdue

    reports, cancel_me, overdue = asyncio.run(go())
    assert reports["cancel-me"].state == S.TASK_STATE_CANCELLED
    assert reports["cancel-me"].message == "stale attempt"
    assert cancel_me.stopped_with == 10.0
    assert (reports["overdue"].state, reports["overdue"].reason) == (S.TASK_STATE_FAILED, "timeout")
    assert "timeout 5s" in reports["overdue"].message
    assert overdue.stopped_with == AgentConfig().stop_grace


def test_leaving_attempts_running_does_not_stop_or_report_them(tmp_path):
    async def go():
        handle = FakeHandle()
        runner, reports = make_runner(
            tmp_path, [RecoveredTask(labels("busy"), handle, started_at=time.time())]
        )
        await runner.recover()
        await runner.stop_all(grace=1.0, leave_running=True)
        return handle, reports, runner

    handle, reports, runner = asyncio.run(go())
    assert handle.stopped_with is None and handle.removed == 0
    assert reports == [] and runner.attempts == {}
