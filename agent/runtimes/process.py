"""The ``process`` runtime: each attempt is a plain subprocess in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from tether.agent.runtimes.base import ExitStatus, LaunchSpec, RecoveredTask, RuntimeError_
from tether.agent.runtimes.capped_log import CappedLog, copy_to_log

__all__ = ["ProcessRuntime"]

# After the task exits, what is left in its pipes is read at once; only a background child that
# inherited them and lives on keeps them open. Stop reading after this long so that such a child
# cannot hold the attempt open.
_DRAIN_GRACE = 1.0


class _ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process, copies: list[asyncio.Task]) -> None:
        self._proc = proc
        self._copies = copies

    async def wait(self) -> ExitStatus:
        code = await self._proc.wait()
        await self._drain()
        if code < 0:
            return ExitStatus(128 - code, "signal", f"killed by {signal.Signals(-code).name}")
        return ExitStatus(code)

    async def _drain(self) -> None:
        _, pending = await asyncio.wait(self._copies, timeout=_DRAIN_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

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


async def _copy_pipe(fd: int, log: CappedLog) -> None:
    """Copy the read end ``fd`` of a pipe into ``log`` until every writer has closed it."""
    pipe = os.fdopen(fd, "rb", buffering=0)
    reader = asyncio.StreamReader()
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        log.close()
        raise
    try:
        await copy_to_log(reader, log)
    finally:
        transport.close()


class ProcessRuntime:
    """Runs tasks as subprocesses of the agent: for development and container-less nodes.

    Resources are accounted by the scheduler but not enforced; ``image`` is ignored.
    The task's stdout and stderr go through the agent into the attempt's log files, which stop
    at ``LaunchSpec.log_limit_bytes`` each. A subprocess does not outlive its agent, so there
    is nothing to recover.
    """

    name = "process"

    def task_path(self, host_path: Path) -> str:
        return str(host_path)

    async def start(self, spec: LaunchSpec) -> _ProcessHandle:
        env = {**os.environ, **spec.env}
        cwd = spec.working_dir or str(spec.attempt_dir)
        try:
            logs = [
                CappedLog(path, spec.log_limit_bytes, _truncation_reporter(spec, stream))
                for stream, path in (("stdout", spec.stdout_path), ("stderr", spec.stderr_path))
            ]
        except OSError as e:
            raise RuntimeError_(f"cannot create the attempt's log files: {e}") from e
        # Our own pipes rather than asyncio's PIPE: Process.wait() would otherwise also wait
        # for the pipes to close, which a background child of the task can put off forever.
        pipes = [os.pipe(), os.pipe()]
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.command,
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=pipes[0][1],
                stderr=pipes[1][1],
                start_new_session=True,
            )
        except BaseException as e:
            # Whatever stopped the start (a missing program, a NUL byte in an argument, a
            # cancel), the read ends and log files must not leak.
            for r, _ in pipes:
                os.close(r)
            for log in logs:
                log.close()
            if not isinstance(e, OSError | ValueError):
                raise
            what = e.strerror if isinstance(e, FileNotFoundError) else e
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {what}") from e
        finally:
            for _, w in pipes:
                os.close(w)  # the child has its copies; ours would keep the pipes open
        copies = [
            asyncio.create_task(_copy_pipe(r, log), name=f"{spec.name} {log.path.name}")
            for (r, _), log in zip(pipes, logs, strict=True)
        ]
        return _ProcessHandle(proc, copies)

    async def recover(self) -> list[RecoveredTask]:
        return []


def _truncation_reporter(spec: LaunchSpec, stream: str):
    on_event = spec.on_event
    if on_event is None:
        return None
    limit = spec.log_limit_bytes
    return lambda: on_event(
        "log_truncated", f"{stream} reached the log limit of {limit} bytes; the rest was discarded"
    )
