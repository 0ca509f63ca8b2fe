"""The task and run state machines: the one place that says which moves are allowed.

Every state change the engine makes goes through :func:`move_task` or :func:`move_run`;
anything not in the tables is refused with :class:`IllegalTransition` and logged, so a bug
shows up as a refused move instead of a corrupted record.
"""

from __future__ import annotations

from tether.api.v1 import types_pb2 as t

__all__ = [
    "RUN_TERMINAL",
    "TASK_ACTIVE",
    "TASK_TERMINAL",
    "IllegalTransition",
    "move_run",
    "move_task",
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
SUCCEEDED, FAILED, RETRYING, CANCELLED, SKIPPED, LOST = (
    TS.TASK_STATE_SUCCEEDED,
    TS.TASK_STATE_FAILED,
    TS.TASK_STATE_RETRYING,
    TS.TASK_STATE_CANCELLED,
    TS.TASK_STATE_SKIPPED,
    TS.TASK_STATE_LOST,
)

TASK_TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, SKIPPED})
# States in which an attempt holds resources on a node.
TASK_ACTIVE = frozenset({SCHEDULED, RUNNING})

TASK_TRANSITIONS: dict[int, frozenset[int]] = {
    PENDING: frozenset({READY, SKIPPED, CANCELLED}),
    # READY -> FAILED: the attempt could not even be prepared (a template did not render).
    READY: frozenset({SCHEDULED, CANCELLED, FAILED}),
    SCHEDULED: frozenset({RUNNING, SUCCEEDED, FAILED, RETRYING, CANCELLED, LOST}),
    RUNNING: frozenset({SUCCEEDED, FAILED, RETRYING, CANCELLED, LOST}),
    RETRYING: frozenset({READY, CANCELLED}),
    LOST: frozenset({READY, CANCELLED, FAILED}),
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
RUN_TERMINAL = frozenset({RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED})

RUN_TRANSITIONS: dict[int, frozenset[int]] = {
    RUN_PENDING: frozenset({RUN_RUNNING, RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED}),
    RUN_RUNNING: frozenset({RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED}),
    RUN_SUCCEEDED: frozenset(),
    RUN_FAILED: frozenset(),
    RUN_CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    """A state change that the lifecycle tables do not allow."""


def task_state_name(state: int) -> str:
    return TS.Name(state).removeprefix("TASK_STATE_")


def run_state_name(state: int) -> str:
    return RS.Name(state).removeprefix("RUN_STATE_")


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
