"""Cancelling runs and tasks, and run deadlines (a run past its deadline is cancelled).

A cancel is a desired state: it is recorded, agents are told to stop, and the tasks finish
when their agents report back.
"""

from __future__ import annotations

import time

from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.committer import Committer
from tether.controller.dispatch import Dispatch
from tether.controller.errors import FailedPrecondition, NotFound
from tether.controller.progress import Progress
from tether.controller.records import RunEntry, TaskEntry
from tether.controller.timers import Timers
from tether.sdk.telemetry import get_logger

__all__ = ["Cancels"]

log = get_logger("controller.engine")


class Cancels:
    """Cancels runs and tasks on request or at the run's deadline."""

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        dispatch: Dispatch,
        progress: Progress,
        timers: Timers,
    ) -> None:
        self.cache = cache
        self.committer = committer
        self.dispatch = dispatch
        self.progress = progress
        self.timers = timers

    def cancel(self, run_id: str, task: str, reason: str) -> list[RunEntry | TaskEntry]:
        """Ask to cancel a run, or one task of it (desired state; the engine converges).
        Returns the records whose writes make the cancel durable.

        Raises:
            NotFound: the run is not cached (unknown or finished), or has no such task.
            FailedPrecondition: the run or task has already finished.
        """
        run = self.cache.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} not found or already finished")
        if run.msg.state in lc.RUN_TERMINAL:
            raise FailedPrecondition(f"run {run_id} already {lc.run_state_name(run.msg.state)}")
        if task:
            entry = run.tasks.get(task)
            if entry is None:
                raise NotFound(f"task {task!r} not found in run {run_id}")
            if entry.msg.state in lc.TASK_TERMINAL:
                raise FailedPrecondition(
                    f"task {task} already {lc.task_state_name(entry.msg.state)}"
                )
            targets = [entry]
        else:
            run.msg.cancel_requested = True
            run.msg.message = reason or "cancelled by user"
            self.committer.mark(run)
            targets = [e for e in run.tasks.values() if e.msg.state not in lc.TASK_TERMINAL]
        for e in targets:
            self.cancel_task(run, e, reason or "cancelled by user")
        self.progress.finish_run_if_done(run)
        return [run, *targets]

    def cancel_task(self, run: RunEntry, e: TaskEntry, reason: str) -> None:
        """Cancel one task: stop its attempt if one is active, else finish it CANCELLED."""
        st = e.msg.state
        if st in lc.TASK_TERMINAL:
            return  # e.g. skipped because an upstream task was cancelled a moment ago
        e.msg.cancel_requested = True
        if st in lc.TASK_ACTIVE:
            # Agents are told once the cancel is in etcd, as everything they are sent.
            self.committer.mark(e, lambda: self._stop_attempt(e, reason))
            return  # the agent's CANCELLED report finishes it
        self.cache.unready((run.msg.id, e.msg.spec.name), e)
        self.timers.disarm((run.msg.id, e.msg.spec.name))
        e.msg.message = reason
        self.progress.finish_task(run, e, lc.CANCELLED)

    def _stop_attempt(self, e: TaskEntry, reason: str) -> None:
        if e.msg.state in lc.TASK_ACTIVE:  # not finished meanwhile
            self.dispatch.cancel_everywhere(e, reason)

    def cancel_requested_tasks(self, run: RunEntry) -> None:
        """Carry a recorded run cancel to tasks that have not finished (after a load)."""
        if run.msg.cancel_requested:
            for e in list(run.tasks.values()):
                if e.msg.state not in lc.TASK_TERMINAL:
                    self.cancel_task(run, e, run.msg.message or "cancelled by user")

    def arm_deadline(self, run: RunEntry) -> None:
        """Cancel the run when its deadline passes, if it has one."""
        if not run.msg.HasField("deadline") or run.msg.state in lc.RUN_TERMINAL:
            return
        delay = max(0.0, run.msg.deadline.ToNanoseconds() / 1e9 - time.time())
        self.timers.later(delay, self._deadline_due, run.msg.id)

    def _deadline_due(self, run_id: str) -> None:
        run = self.cache.runs.get(run_id)
        if run is None or run.msg.state in lc.RUN_TERMINAL or run.msg.timed_out:
            return
        run.msg.timed_out = True
        spec_timeout = run.msg.deadline.ToNanoseconds() - run.msg.created_at.ToNanoseconds()
        reason = f"run timed out after {spec_timeout / 1e9:g}s"
        log.warning("run timed out", run_id=run_id)
        self.cancel(run_id, "", reason)
