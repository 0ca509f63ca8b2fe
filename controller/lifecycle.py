"""The task and run state machines: the one place that says which moves are allowed.

Every state change the controller makes goes through :func:`move_task`, :func:`move_run`,
:func:`new_attempt` or :func:`move_attempt`;
anything not in the tables is refused with :class:`IllegalTransition` and logged, so a bug
shows up as a refused move instead of a corrupted record.
"""

from __future__ import annotations

from tether.api.v1 import types_pb2 as t
from tether.sdk.states import (
    TERMINAL_RUN_STATES,
    TERMINAL_TASK_STATES,
    run_state_name,
    task_state_name,
)

__all__ = [
    "RUN_TERMINAL",
    "TASK_ACTIVE",
    "TASK_TERMINAL",
    "IllegalTransition",
    "move_attempt",
    "move_run",
    "move_task",
    "new_attempt",
    "run_state_name",
    "task_state_name",
]

TS = t.TaskState
RS = t.RunState

PENDING, READY, SCHEDULED, RUNNING = (
    TS.TASK_STATE_PENDING,
    TS.TASK_STATE_READY,
    TS.TASK_STATE_SCHEDULED,
    TS.TASK_STATE_RUNNING,
)
SUCCEEDED, FAILED, RETRYING, CANCELLED, SKIPPED, LOST, PREEMPTED = (
    TS.TASK_STATE_SUCCEEDED,
    TS.TASK_STATE_FAILED,
    TS.TASK_STATE_RETRYING,
    TS.TASK_STATE_CANCELLED,
    TS.TASK_STATE_SKIPPED,
    TS.TASK_STATE_LOST,
    TS.TASK_STATE_PREEMPTED,
)

# Final states are a fact clients need too; they are defined once, in the SDK.
TASK_TERMINAL = TERMINAL_TASK_STATES
# States in which an attempt holds resources on a node.
TASK_ACTIVE = frozenset({SCHEDULED, RUNNING})

TASK_TRANSITIONS: dict[int, frozenset[int]] = {
    PENDING: frozenset({READY, SKIPPED, CANCELLED}),
    # READY -> FAILED: the attempt could not even be prepared (a template did not render).
    READY: frozenset({SCHEDULED, CANCELLED, FAILED}),
    SCHEDULED: frozenset({RUNNING, SUCCEEDED, FAILED, RETRYING, CANCELLED, LOST, PREEMPTED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, RETRYING, CANCELLED, LOST, PREEMPTED}),
    RETRYING: frozenset({READY, CANCELLED}),
    LOST: frozenset({READY, CANCELLED, FAILED}),
    # Stopped for a task of higher priority: ready again at once, free of charge.
    PREEMPTED: frozenset({READY, CANCELLED, FAILED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    SKIPPED: frozenset(),
}

RUN_PENDING, RUN_RUNNING = RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING
RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED = (
    RS.RUN_STATE_SUCCEEDED,
    RS.RUN_STATE_FAILED,
    RS.RUN_STATE_CANCELLED,
)
RUN_TERMINAL = TERMINAL_RUN_STATES

RUN_TRANSITIONS: dict[int, frozenset[int]] = {
    RUN_PENDING: frozenset({RUN_RUNNING, RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED}),
    RUN_RUNNING: frozenset({RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED}),
    RUN_SUCCEEDED: frozenset(),
    RUN_FAILED: frozenset(),
    RUN_CANCELLED: frozenset(),
}


# An attempt record follows its task while it is current, and is then left as it ended. An
# attempt reported SUCCEEDED may still fail on the controller's side (its output is too big).
_ATTEMPT_OPEN = frozenset({TS.TASK_STATE_UNSPECIFIED, SCHEDULED, RUNNING})
ATTEMPT_TRANSITIONS: dict[int, frozenset[int]] = {
    **{
        s: frozenset({RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST, PREEMPTED})
        for s in _ATTEMPT_OPEN
    },
    SUCCEEDED: frozenset({FAILED}),
}


class IllegalTransition(Exception):
    """A state change that the lifecycle tables do not allow."""


def can_move_task(src: int, dst: int) -> bool:
    return dst in TASK_TRANSITIONS.get(src, frozenset())


def move_task(task: t.TaskRun, dst: int) -> None:
    """Set ``task.state`` to ``dst`` if the move is allowed.

    Raises:
        IllegalTransition: the move is not in the table.
    """
    if not can_move_task(task.state, dst):
        raise IllegalTransition(
            f"task {task.spec.name} of run {task.run_id}: "
            f"{task_state_name(task.state)} -> {task_state_name(dst)} is not allowed"
        )
    task.state = dst
    if dst != READY and task.waiting_reason:
        # Why a task waits for a node is stale once it left the queue (bound, cancelled,
        # failed): `tether status` would show it in place of the task's message.
        task.waiting_reason = ""


def move_run(run: t.Run, dst: int) -> None:
    """Set ``run.state`` to ``dst`` if the move is allowed.

    Raises:
        IllegalTransition: the move is not in the table.
    """
    if dst not in RUN_TRANSITIONS.get(run.state, frozenset()):
        raise IllegalTransition(
            f"run {run.id}: {run_state_name(run.state)} -> {run_state_name(dst)} is not allowed"
        )
    run.state = dst


def new_attempt(task: t.TaskRun, **fields) -> t.Attempt:
    """Append the task's next attempt record, SCHEDULED, with ``fields`` set."""
    return task.attempts.add(state=SCHEDULED, **fields)


def move_attempt(task: t.TaskRun, attempt: t.Attempt, dst: int) -> None:
    """Set an attempt record's state to ``dst`` if the move is allowed.

    Raises:
        IllegalTransition: the move is not in the table.
    """
    if dst not in ATTEMPT_TRANSITIONS.get(attempt.state, frozenset()):
        raise IllegalTransition(
            f"attempt {attempt.number} of task {task.spec.name} of run {task.run_id}: "
            f"{task_state_name(attempt.state)} -> {task_state_name(dst)} is not allowed"
        )
    attempt.state = dst
