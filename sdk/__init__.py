"""The Tether SDK: build and submit workflows, follow their runs.

from tether.sdk import Client, Workflow
"""

import os

# gRPC's core prints its info lines on stderr (a refused TLS handshake logs one per try),
# which bury the one line a CLI error prints and fill the servers' logs; it reads this once,
# when first imported, which is why it is here. A value set by the user is kept.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

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
