"""Run and task states as users see them: which are final, and their short names.

The transition tables live with the controller (``tether.controller.lifecycle``); these are
the facts a client needs too, so they are defined here once and used by both.
"""

from __future__ import annotations

from enum import IntEnum

from tether.api.v1 import types_pb2 as t

__all__ = [
    "DRAINED",
    "FENCED",
    "FINAL_REPORT_STATES",
    "TERMINAL_RUN_STATES",
    "TERMINAL_TASK_STATES",
    "RunState",
    "TaskState",
    "run_state_name",
    "task_state_name",
]


class RunState(IntEnum):
    """A run's state with its name: ``RunState(run.state).name == "SUCCEEDED"``.

    The values are the API's ``tether.v1.RunState`` (a unit test keeps them equal), so a
    member compares equal to the integer a :class:`~tether.api.v1.types_pb2.Run` carries.
    """

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        """Whether the run has ended (it changes no more)."""
        return self in TERMINAL_RUN_STATES


class TaskState(IntEnum):
    """A task's state with its name: ``TaskState(task.state).name == "RUNNING"``.

    The values are the API's ``tether.v1.TaskState`` (a unit test keeps them equal).
    """

    UNSPECIFIED = 0
    PENDING = 1
    READY = 2
    SCHEDULED = 3
    RUNNING = 4
    SUCCEEDED = 5
    FAILED = 6
    RETRYING = 7
    CANCELLED = 8
    SKIPPED = 9
    LOST = 10
    PREEMPTED = 11

    @property
    def terminal(self) -> bool:
        """Whether the task has ended (it changes no more)."""
        return self in TERMINAL_TASK_STATES


TERMINAL_RUN_STATES = frozenset(
    {
        t.RunState.RUN_STATE_SUCCEEDED,
        t.RunState.RUN_STATE_FAILED,
        t.RunState.RUN_STATE_CANCELLED,
    }
)

TERMINAL_TASK_STATES = frozenset(
    {
        t.TaskState.TASK_STATE_SUCCEEDED,
        t.TaskState.TASK_STATE_FAILED,
        t.TaskState.TASK_STATE_CANCELLED,
        t.TaskState.TASK_STATE_SKIPPED,
    }
)

# The reason of a final report for an attempt its agent stopped because it had been out of
# contact with every controller for longer than its disconnect grace (the attempt may be
# running elsewhere by now). The controller retries it without counting it as a failure.
FENCED = "fenced"
# The reason of a final report for an attempt stopped because its node was drained; retried
# elsewhere, not counted as a failure either.
DRAINED = "drained"

# The states in which an agent reports an attempt as ended (it never reports SKIPPED: that is
# decided by the controller for tasks that never ran).
FINAL_REPORT_STATES = frozenset(
    {
        t.TaskState.TASK_STATE_SUCCEEDED,
        t.TaskState.TASK_STATE_FAILED,
        t.TaskState.TASK_STATE_CANCELLED,
    }
)


def run_state_name(state: int) -> str:
    """``RUN_STATE_SUCCEEDED`` → ``"SUCCEEDED"``; unknown values print as their number."""
    try:
        return t.RunState.Name(state).removeprefix("RUN_STATE_")
    except ValueError:
        return str(state)


def task_state_name(state: int) -> str:
    """``TASK_STATE_RUNNING`` → ``"RUNNING"``; unknown values print as their number."""
    try:
        return t.TaskState.Name(state).removeprefix("TASK_STATE_")
    except ValueError:
        return str(state)
