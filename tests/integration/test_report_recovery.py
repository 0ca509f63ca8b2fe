"""A final report outlives its agent until the controller acknowledges it, and not after:
the process runtime's tasks keep no record of their own, only status.pb (real processes, no
controller)."""

from __future__ import annotations

import asyncio

from helpers import S
from opentelemetry import trace

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runner import Runner
from tether.agent.runtimes.process import PROCESS_FILE, REPORTS_MARKER, ProcessRuntime
from tether.api.v1 import agent_pb2


def _agent(work_dir, persist_after: float = 0.05):
    """A runner as a (re)started agent has it: recovered before its first assignment."""
    reports: list[agent_pb2.TaskStatus] = []
    config = AgentConfig(node="n1", work_dir=work_dir)
    runtime = ProcessRuntime(config)
    runner = Runner(config, runtime, trace.get_tracer("test"), reports.append)
    runner.reports.persist_after = persist_after
    return runner, runtime, reports


def _assign(task: str) -> agent_pb2.AssignTask:
    a = agent_pb2.AssignTask(ref=agent_pb2.AttemptRef(run_id="run1", task=task, attempt=1))
    a.spec.name = task
    a.spec.command.extend(["/bin/sh", "-c", 'echo \'{"n": 7}\' > "$TETHER_OUTPUT_FILE"'])
    return a


async def _finished(runner, reports, count):
    for _ in range(500):
        if len([r for r in reports if r.state != S.TASK_STATE_RUNNING]) >= count:
            return [r for r in reports if r.state != S.TASK_STATE_RUNNING]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no final reports: {reports}")


def test_an_unacknowledged_report_is_sent_again_by_the_next_agent_and_an_acked_one_not(
    tmp_path,
):
    async def go():
        runner, runtime, reports = _agent(tmp_path)
        assert await runner.recover() == 0
        runner.assign(_assign("kept"))
        runner.assign(_assign("acked"))
        done = {r.ref.task: r for r in await _finished(runner, reports, 2)}
        assert done["kept"].state == S.TASK_STATE_SUCCEEDED
        assert done["kept"].outputs_json.strip() == '{"n": 7}'
        runner.ack(done["acked"].ref)
        await runner.reports.drain(5)
        await asyncio.sleep(0.2)  # past persist_after: the unacknowledged report is written
        d = layout.attempt_dir(tmp_path, "run1", "kept", 1)
        # No process record for a task that dies with its agent; the report until acked.
        assert not (d / PROCESS_FILE).exists() and (d / layout.STATUS_FILE).exists()
        acked = layout.attempt_dir(tmp_path, "run1", "acked", 1)
        assert not (acked / layout.STATUS_FILE).exists()
        await runtime.close()

        # The agent died before "kept" was acknowledged: the next one sends it again.
        runner2, runtime2, reports2 = _agent(tmp_path)
        assert await runner2.recover() == 1
        assert [r.ref.task for r in reports2] == ["kept"]
        assert reports2[0] == done["kept"]
        runner2.ack(reports2[0].ref)
        await runner2.reports.drain(5)
        await runtime2.close()

        runner3, runtime3, reports3 = _agent(tmp_path)
        assert await runner3.recover() == 0 and reports3 == []
        await runtime3.close()

    asyncio.run(go())


def test_reports_an_older_agent_left_after_their_ack_are_not_sent_again(tmp_path):
    old = agent_pb2.TaskStatus(
        ref=agent_pb2.AttemptRef(run_id="run1", task="old", attempt=1),
        state=S.TASK_STATE_SUCCEEDED,
    )
    # An older agent kept every report (acknowledged or not) and a record of each process;
    # a report without a record was acknowledged.
    acked = layout.attempt_dir(tmp_path, "run1", "old", 1)
    acked.mkdir(parents=True)
    (acked / layout.STATUS_FILE).write_bytes(old.SerializeToString())
    pending = layout.attempt_dir(tmp_path, "run1", "pending", 1)
    pending.mkdir(parents=True)
    pending_report = agent_pb2.TaskStatus(
        ref=agent_pb2.AttemptRef(run_id="run1", task="pending", attempt=1),
        state=S.TASK_STATE_FAILED,
        reason="exit_code",
    )
    (pending / layout.STATUS_FILE).write_bytes(pending_report.SerializeToString())
    (pending / PROCESS_FILE).write_text(
        '{"pid": 999999, "ticks": 0, "started_at": 0, "labels": {"tether.run": "run1", '
        '"tether.task": "pending", "tether.attempt": "1"}}'
    )

    async def go():
        runner, runtime, reports = _agent(tmp_path)
        assert await runner.recover() == 1
        assert reports == [pending_report]
        assert not (acked / layout.STATUS_FILE).exists()
        assert (tmp_path / REPORTS_MARKER).exists()
        await runtime.close()

    asyncio.run(go())


def test_a_report_cut_short_or_not_the_attempts_own_is_removed_not_sent(tmp_path):
    async def go():
        runner, runtime, _ = _agent(tmp_path)
        assert await runner.recover() == 0  # marks the work dir
        await runtime.close()
        cut = layout.attempt_dir(tmp_path, "run1", "cut", 1)
        cut.mkdir(parents=True)
        (cut / layout.STATUS_FILE).write_bytes(b"")  # the agent died while writing it
        other = layout.attempt_dir(tmp_path, "run1", "other", 1)
        other.mkdir(parents=True)
        wrong = agent_pb2.TaskStatus(
            ref=agent_pb2.AttemptRef(run_id="run1", task="elsewhere", attempt=1),
            state=S.TASK_STATE_SUCCEEDED,
        )
        (other / layout.STATUS_FILE).write_bytes(wrong.SerializeToString())

        runner2, runtime2, reports2 = _agent(tmp_path)
        assert await runner2.recover() == 0 and reports2 == []
        assert not (cut / layout.STATUS_FILE).exists()
        assert not (other / layout.STATUS_FILE).exists()
        await runtime2.close()

    asyncio.run(go())


def test_a_report_is_written_only_once_unacknowledged_for_a_while_or_when_the_agent_stops(
    tmp_path,
):
    async def go():
        runner, runtime, reports = _agent(tmp_path, persist_after=30)
        assert await runner.recover() == 0
        for task in ("quick", "slow", "at-stop"):
            runner.assign(_assign(task))
        done = {r.ref.task: r for r in await _finished(runner, reports, 3)}
        status = {t: layout.attempt_dir(tmp_path, "run1", t, 1) / layout.STATUS_FILE for t in done}
        # Acknowledged within persist_after: never written, nothing to remove.
        runner.ack(done["quick"].ref)
        assert not any(p.exists() for p in status.values())
        runner.reports.persist()  # as the timer does once they are due
        assert status["slow"].exists() and status["at-stop"].exists()
        assert not status["quick"].exists()
        runner.ack(done["slow"].ref)
        assert not status["slow"].exists()  # written, then removed on its ack

        # A report kept after that is written by the agent's stop, long before its timer.
        runner.reports.persist_after = 30
        runner.assign(_assign("last"))
        await _finished(runner, reports, 4)
        last = layout.attempt_dir(tmp_path, "run1", "last", 1) / layout.STATUS_FILE
        assert not last.exists()
        await runner.stop_all(grace=1)
        assert last.exists() and status["at-stop"].exists()
        await runtime.close()

        runner2, runtime2, reports2 = _agent(tmp_path)
        assert await runner2.recover() == 2
        assert sorted(r.ref.task for r in reports2) == ["at-stop", "last"]
        await runtime2.close()

    asyncio.run(go())
