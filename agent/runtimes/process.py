"""The ``process`` runtime: each attempt is a plain subprocess in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from tether.agent.runtimes.base import ExitStatus, LaunchSpec, RecoveredTask, RuntimeError_

__all__ = ["ProcessRuntime"]


class _ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    async def wait(self) -> ExitStatus:
        code = await self._proc.wait()
        if code < 0:
            return ExitStatus(128 - code, "signal", f"killed by {signal.Signals(-code).name}")
        return ExitStatus(code)

    def _signal(self, sig: int) -> None:
        # The whole group, so that shells and their children stop too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, grace: float) -> None:
        if self._proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), grace)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await self._proc.wait()

    async def remove(self) -> None:
        return None  # an ended subprocess leaves nothing behind


class ProcessRuntime:
    """Runs tasks as subprocesses of the agent: for development and container-less nodes.

    Resources are accounted by the scheduler but not enforced; ``image`` is ignored.
    A subprocess does not outlive its agent, so there is nothing to recover.
    """

    name = "process"

    def task_path(self, host_path: Path) -> str:
        return str(host_path)

    async def start(self, spec: LaunchSpec) -> _ProcessHandle:
        env = {**os.environ, **spec.env}
        cwd = spec.working_dir or str(spec.attempt_dir)
        try:
            with open(spec.stdout_path, "wb") as out, open(spec.stderr_path, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *spec.command,
                    env=env,
                    cwd=cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        except FileNotFoundError as e:
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {e.strerror}") from e
        except (PermissionError, NotADirectoryError, OSError) as e:
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {e}") from e
        return _ProcessHandle(proc)

    async def recover(self) -> list[RecoveredTask]:
        return []
