"""When a final report's copy (status.pb) is written: a plain result once it has waited its
own persist_after for an acknowledgement, any other at once, and everything once the agent
stops (no processes; the wait is set by hand, not slept through)."""

from __future__ import annotations

import asyncio
import time

from tether.agent import layout
from tether.agent.reports import Reports
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t

S = t.TaskState


def _status(task: str, state: int = S.TASK_STATE_SUCCEEDED, reason: str = ""):
    ref = agent_pb2.AttemptRef(run_id="r", task=task, attempt=1)
    return agent_pb2.TaskStatus(ref=ref, state=state, reason=reason)


def test_plain_results_wait_their_own_time_and_other_reports_are_written_at_once(tmp_path):
    def kept(task: str) -> bool:
        return (tmp_path / task / layout.STATUS_FILE).exists()

    async def go():
        reports = Reports(persist_after=10)
        cases = {
            "ok": _status("ok"),
            "exit": _status("exit", S.TASK_STATE_FAILED, "exit_code"),
            "timeout": _status("timeout", S.TASK_STATE_FAILED, "timeout"),
            "fenced": _status("fenced", S.TASK_STATE_FAILED, "fenced"),
            "cancelled": _status("cancelled", S.TASK_STATE_CANCELLED, "cancelled"),
        }
        for task, status in cases.items():
            (tmp_path / task).mkdir()
            reports.keep(status, None, tmp_path / task)
        # No runtime record says why these ended: written at once.
        assert [task for task in cases if kept(task)] == ["timeout", "fenced", "cancelled"]

        # "ok" has waited its time, "exit" half of it: the timer writes only "ok", then
        # waits for "exit" alone.
        now = time.monotonic()
        for task, kept_at in (("ok", now - 11), ("exit", now - 5)):
            key = ("r", task, 1)
            status, path, _ = reports._unwritten[key]
            reports._unwritten[key] = (status, path, kept_at)
        reports._write_due()
        assert kept("ok") and not kept("exit")
        assert reports._timer is not None
        assert 4 < reports._timer.when() - asyncio.get_running_loop().time() <= 5.1

        reports.ack(cases["exit"].ref)  # acknowledged in time: never written
        reports.ack(cases["ok"].ref)  # written, then removed on its ack
        assert not kept("exit") and not kept("ok")

        # Stopping writes what is left, and every report kept after it at once.
        (tmp_path / "late").mkdir()
        reports.persist(final=True)
        reports.keep(_status("late"), None, tmp_path / "late")
        assert kept("late")

    asyncio.run(go())
