"""The small protocol every runtime implements: start, wait, stop, remove, recover.

The runner owns everything runtime-independent (files, outputs, timeouts, reports); a
runtime only turns a :class:`LaunchSpec` into a running unit of work and back into an
:class:`ExitStatus`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["ExitStatus", "LaunchSpec", "RecoveredTask", "Runtime", "RuntimeError_", "TaskHandle"]


class RuntimeError_(Exception):
    """The runtime could not start the task (bad image, missing program, engine down)."""

    def __init__(self, message: str, reason: str = "runtime_error") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runtime needs to start one attempt."""

    name: str
    command: list[str]
    env: dict[str, str]
    working_dir: str
    # Plain strings (a Path is accepted too): built for every attempt, where pathlib's parsing
    # cost more than the system calls that use them.
    attempt_dir: str | Path
    stdout_path: str | Path
    stderr_path: str | Path
    image: str = ""
    cpu: float = 0.0
    memory_bytes: int = 0
    gpu_indices: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    # "if-not-present" (or ""), "always" or "never": when a container runtime pulls `image`.
    image_pull_policy: str = ""
    # Most bytes kept in each of stdout_path and stderr_path (AgentConfig.log_limit_bytes);
    # later output is drained and discarded, with a note at the end of the file (see
    # tether.agent.runtimes.capped_log). 0 keeps everything.
    log_limit_bytes: int = 0
    # Report an event of this attempt to the controller: on_event(kind, message).
    on_event: Callable[[str, str], None] | None = field(default=None, compare=False)
    # Wrap a step of starting the attempt ("pull", "create", "start"): the runner makes each
    # a span of the attempt's trace. ``with spec.phase("pull"): ...``
    phase: Callable[[str], AbstractContextManager] = field(
        default=lambda _name: contextlib.nullcontext(), compare=False
    )


@dataclass(frozen=True)
class ExitStatus:
    """How an attempt ended. ``reason`` is empty for a plain exit code."""

    exit_code: int
    reason: str = ""
    message: str = ""
    # False when the runtime knows the attempt wrote nothing to stdout or stderr (its log
    # files were never created): no tails to read.
    printed: bool = True


class TaskHandle(Protocol):
    """A started attempt.

    A handle may set ``needs_remove = False`` when :meth:`remove` has nothing to do: the
    runner then does not call it (one task fewer per attempt). It may also offer ``exit_future``, a
    future done once the attempt has exited, after which :meth:`wait` returns without waiting
    for the exit: the supervisor then waits on that future instead of a task of its own.
    """

    async def wait(self) -> ExitStatus:
        """Wait for the attempt to end and its output to be in its log files.

        ``tether logs -f`` stops following once this returns, so output written to the log
        files afterwards is not streamed.
        """
        ...

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Safe to call more than once."""
        ...

    async def remove(self) -> None:
        """Forget the ended attempt in the runtime (delete its container). Idempotent.

        The runner calls it once the controller has acknowledged the attempt's final report:
        until then the ended container is the record an agent restart recovers the result from.
        """
        ...


@dataclass(frozen=True)
class RecoveredTask:
    """Work found after an agent restart, with the labels it was started with.

    Attributes:
        labels: The attempt's labels (``LaunchSpec.labels``): run, task, attempt, node.
        handle: The attempt; ``wait()`` returns at once when it has already ended.
        running: False when the attempt ended while no agent watched it.
        started_at: When the attempt started, seconds since the epoch (0: unknown).
    """

    labels: dict[str, str]
    handle: TaskHandle
    running: bool = True
    started_at: float = 0.0


class Runtime(Protocol):
    """A way to run tasks: ``process`` or ``docker``."""

    name: str

    def task_path(self, host_path: str | Path) -> str:
        """The path under which the task sees ``host_path`` (inside a container, say)."""
        ...

    async def start(self, spec: LaunchSpec) -> TaskHandle:
        """Start an attempt. Raises RuntimeError_ if it cannot be started."""
        ...

    async def recover(self) -> list[RecoveredTask]:
        """Find attempts this node started before a restart, running or ended."""
        ...
