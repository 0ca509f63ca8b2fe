"""The workflow graph's rules: when a task may run, what a finished task does to its
dependents, and what a run's outcome is. Pure: it changes cached records, never etcd or agents;
:mod:`tether.controller.progress` commits what it decides.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.records import RunEntry, TaskEntry, now

__all__ = ["Step", "cascade", "count_waiting", "run_outcome", "satisfies", "skip_reason"]


def satisfies(m: t.TaskRun) -> bool:
    """Whether a finished upstream task lets its dependents run."""
    return m.state == lc.SUCCEEDED or (m.state == lc.FAILED and m.spec.allow_failure)


def _skip_message(upstream: t.TaskRun) -> str:
    return f"upstream task {upstream.spec.name} {lc.task_state_name(upstream.state).lower()}"


@dataclass(frozen=True)
class Step:
    """One change :func:`cascade` made: a task ``finished``, or became ``ready``."""

    entry: TaskEntry
    ready: bool


def count_waiting(run: RunEntry, e: TaskEntry) -> str | None:
    """Count a PENDING task's unfinished upstream tasks into ``e.waiting``.

    Returns the name of a finished upstream task that does not let it run (the task must be
    skipped), else None; the task is ready when ``e.waiting`` is 0.
    """
    e.waiting = 0
    for dep in e.msg.spec.depends_on:
        d = run.tasks[dep].msg
        if satisfies(d):
            continue
        if d.state in lc.TASK_TERMINAL:
            return dep
        e.waiting += 1
    return None


def skip_reason(run: RunEntry, upstream: str) -> str:
    """The message of a task skipped because ``upstream`` finished badly."""
    return _skip_message(run.tasks[upstream].msg)


def cascade(run: RunEntry, e: TaskEntry, state: int, already_moved: bool = False) -> Iterator[Step]:
    """Finish ``e`` in ``state`` and carry it down the graph, yielding every change in order.

    Dependents whose last upstream task finished well become READY; dependents of a task that
    finished badly are SKIPPED, and so on down. ``already_moved``: ``e`` is in its final state.
    Lazy: each change is made as it is yielded, so that a caller can spread a fan-out of
    100,000 dependents over several turns of the loop; each dependent's state is checked
    when its turn comes.
    """
    # A work list, not recursion: a chain may be thousands of tasks long.
    work = [(e, state, already_moved)]
    while work:
        e, state, already_moved = work.pop()
        if not already_moved and e.msg.state in lc.TASK_TERMINAL:
            continue  # skipped already, through another failed upstream task
        if not already_moved:
            lc.move_task(e.msg, state)
        if not e.msg.HasField("finished_at"):
            e.msg.finished_at.CopyFrom(now())
        run.unfinished -= 1
        yield Step(e, ready=False)
        ok = satisfies(e.msg)
        for name in e.children:
            child = run.tasks[name]
            if child.msg.state != lc.PENDING:
                continue
            if ok:
                child.waiting -= 1
                if child.waiting <= 0:
                    lc.move_task(child.msg, lc.READY)
                    yield Step(child, ready=True)
            else:
                child.msg.message = _skip_message(e.msg)
                work.append((child, lc.SKIPPED, False))


def run_outcome(run: RunEntry) -> tuple[int, str] | None:
    """The final state and message of a run whose tasks have all finished, else None."""
    if run.unfinished > 0 or run.msg.state in lc.RUN_TERMINAL:
        return None
    states = [e.msg for e in run.tasks.values()]
    message = run.msg.message
    if run.msg.timed_out:
        return lc.RUN_FAILED, message
    if run.msg.cancel_requested:
        return lc.RUN_CANCELLED, message
    if any(
        (m.state == lc.FAILED and not m.spec.allow_failure) or m.state in (lc.CANCELLED, lc.SKIPPED)
        for m in states
    ):
        failed = [m.spec.name for m in states if m.state == lc.FAILED and not m.spec.allow_failure]
        return lc.RUN_FAILED, message or (
            f"failed tasks: {', '.join(failed)}" if failed else "tasks were cancelled"
        )
    return lc.RUN_SUCCEEDED, message
