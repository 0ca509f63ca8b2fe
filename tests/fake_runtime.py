"""A runtime without processes or containers, for tests of the runner and the agent.

It implements the protocol of ``tether.agent.runtimes.base``: attempts end when a test says
so (``FakeHandle.finish``) or at once with a preset exit status, and ``recover`` returns
what the test put there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tether.agent.runtimes.base import ExitStatus, LaunchSpec, RecoveredTask, RuntimeError_

__all__ = ["FakeHandle", "FakeRuntime"]


class FakeHandle:
    """An attempt that ends when ``finish`` is called (or has ended already)."""

    def __init__(self, result: ExitStatus | None = None) -> None:
        self.ended = asyncio.Event()
        self.result = result
        self.stopped_with: float | None = None
        self.removed = 0
        if result is not None:
            self.ended.set()

    def finish(self, result: ExitStatus) -> None:
        """End the attempt with ``result``."""
        self.result = result
        self.ended.set()

    async def wait(self) -> ExitStatus:
        await self.ended.wait()
        assert self.result is not None
        return self.result

    async def stop(self, grace: float) -> None:
        self.stopped_with = grace
        self.finish(ExitStatus(143))

    async def remove(self) -> None:
        self.removed += 1


class FakeRuntime:
    """A runtime whose attempts are :class:`FakeHandle` objects.

    Args:
        found: What ``recover`` returns.
        exit_status: The status started attempts end with at once; None leaves them
            running until the test calls ``finish`` on their handle (``handles``).
        start_error: Raised by ``start`` when set (a runtime that cannot start work).
    """

    name = "fake"

    def __init__(
        self,
        found: list[RecoveredTask] | None = None,
        exit_status: ExitStatus | None = None,
        start_error: RuntimeError_ | None = None,
    ) -> None:
        self.found = list(found or [])
        self.exit_status = exit_status
        self.start_error = start_error
        self.started: list[LaunchSpec] = []
        self.handles: list[FakeHandle] = []

    def task_path(self, host_path: Path) -> str:
        return str(host_path)

    async def start(self, spec: LaunchSpec) -> FakeHandle:
        if self.start_error is not None:
            raise self.start_error
        self.started.append(spec)
        handle = FakeHandle(self.exit_status)
        self.handles.append(handle)
        return handle

    async def recover(self) -> list[RecoveredTask]:
        return self.found
