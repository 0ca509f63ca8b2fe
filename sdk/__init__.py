"""The Tether SDK: build and submit workflows, follow their runs.

from tether.sdk import Client, Workflow
"""

from tether.sdk.client import Client, LogChunk, RunHandle
from tether.sdk.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidSpecError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    TetherError,
    TimeoutError,
    UnauthenticatedError,
    UnavailableError,
)
from tether.sdk.spec import Secret, Task, Workflow, load_workflow
from tether.sdk.states import RunState, TaskState

__all__ = [
    "AlreadyExistsError",
    "Client",
    "FailedPreconditionError",
    "InvalidSpecError",
    "LogChunk",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RunHandle",
    "RunState",
    "Secret",
    "Task",
    "TaskState",
    "TetherError",
    "TimeoutError",
    "UnauthenticatedError",
    "UnavailableError",
    "Workflow",
    "load_workflow",
]
