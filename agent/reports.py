"""Final reports the controller has not acknowledged yet, in memory and on disk.

A final report is kept until the controller acknowledges it, so that a result survives a
broken stream or a controller restart: the agent sends every pending report again when it
registers (``Register.pending_reports``) and before each heartbeat. A copy is written beside
the attempt's files (``status.pb``) for a restarted agent, which finds it when it recovers
the ended attempt; the copy is removed once acknowledged, so that a ``status.pb`` on disk is
always a report the controller may not have. Only once acknowledged is the attempt removed
from the runtime (its container deleted): until then the runtime's record is what a
restarted agent recovers.

The copy of a plain result — success, or failure by exit code, signal, output or
out-of-memory, which is what a runtime's own record gives back after a restart — is written
only once the report has waited :data:`PERSIST_AFTER` for its acknowledgement, and for every
one left when the agent stops: the controller acknowledges most within a few milliseconds,
and creating and removing a file for each was a tenth of the agent's work per attempt. A
crash of the agent within that window loses nothing a runtime would keep: the process
runtime's tasks die with their agent and are run again as lost, as those still running then
are; tasks left running (``--leave-running``, containers) keep their own record (exit code
file, container), from which a restarted agent reports the same result. Any other report
(cancelled, timed out, stopped for the node's sake, a runtime error) is written at once: its
reason is in no runtime's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from tether.agent import layout
from tether.agent.launch import write_file
from tether.agent.runtimes.base import TaskHandle
from tether.agent.supervision import Key, key_of
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.telemetry import get_logger

__all__ = ["PERSIST_AFTER", "Reports", "saved_status"]

# Seconds a final report with a plain result may stay unacknowledged before its copy is
# written to disk.
PERSIST_AFTER = 0.2
# Reasons of failure that a runtime's own record reproduces after a restart (see above).
_PLAIN_FAILURES = frozenset({"exit_code", "signal", "output", "oom"})

log = get_logger("agent.runner")
_SUCCEEDED = t.TaskState.TASK_STATE_SUCCEEDED


def saved_status(d: str, ref: agent_pb2.AttemptRef) -> agent_pb2.TaskStatus | None:
    """The final report a previous agent kept in the attempt directory ``d``, if any."""
    try:
        saved = agent_pb2.TaskStatus.FromString(Path(d, layout.STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return saved if key_of(saved.ref) == key_of(ref) else None


class Reports:
    """The unacknowledged final reports and the runtime handles of their ended attempts."""

    def __init__(self, persist_after: float = PERSIST_AFTER) -> None:
        self.persist_after = persist_after
        self.unacked: dict[Key, agent_pb2.TaskStatus] = {}
        # Ended attempts whose reports are not acknowledged yet: removed from the runtime on ack.
        self.ended: dict[Key, TaskHandle] = {}
        # Where each unacknowledged report was written (removed on ack).
        self._files: dict[Key, str] = {}
        # Reports not written yet, oldest first, with where they go and when they were kept
        # (time.monotonic()); the one timer writing the oldest when it is due; and whether
        # every report is written at once (the agent is stopping).
        self._unwritten: dict[Key, tuple[agent_pb2.TaskStatus, str, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._write_through = False
        self._background: set[asyncio.Task] = set()

    def __contains__(self, key: Key) -> bool:
        return key in self.unacked

    def get(self, key: Key) -> agent_pb2.TaskStatus | None:
        """The pending final report of an attempt, if any."""
        return self.unacked.get(key)

    def pending(self) -> list[agent_pb2.TaskStatus]:
        """Every final report to send (again) to the controller."""
        return list(self.unacked.values())

    def keep(
        self,
        status: agent_pb2.TaskStatus,
        handle: TaskHandle | None,
        d: str,
        on_disk: bool = False,
    ) -> None:
        """Keep a final report until acknowledged: in memory, and in ``d`` (when it exists) at
        once, or for a plain result once unacknowledged for :attr:`persist_after` seconds.

        ``on_disk``: the report was read from ``d`` (a previous agent's), to be removed on
        acknowledgement like one written here.
        """
        key = key_of(status.ref)
        self.unacked[key] = status
        if handle is not None:
            self.ended[key] = handle
        path = f"{d}/{layout.STATUS_FILE}"
        if on_disk:
            self._files[key] = path
            return
        plain = status.state == _SUCCEEDED or status.reason in _PLAIN_FAILURES
        if self._write_through or not plain:
            self._unwritten.pop(key, None)
            self._write(key, status, path)
            return
        self._unwritten.pop(key, None)  # kept again: its wait starts again, at the end
        self._unwritten[key] = (status, path, time.monotonic())
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to wait on: now
                self.persist()
                return
            self._timer = loop.call_later(self.persist_after, self._write_due)

    def _write_due(self) -> None:
        """Write the reports that have waited :attr:`persist_after`; wait for the next one.

        Each waits its own full time: writing every unwritten report whenever the timer
        fired would write most of those kept just before it.
        """
        self._timer = None
        due = time.monotonic() - self.persist_after
        while self._unwritten:
            key, (status, path, kept_at) = next(iter(self._unwritten.items()))
            if kept_at > due:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(kept_at - due, self._write_due)
                return
            del self._unwritten[key]
            self._write(key, status, path)

    def persist(self, final: bool = False) -> None:
        """Write every kept report not written yet, now.

        ``final``: the agent is stopping; reports kept from now on are written at once too.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write_through = self._write_through or final
        unwritten, self._unwritten = self._unwritten, {}
        for key, (status, path, _kept_at) in unwritten.items():
            self._write(key, status, path)

    def _write(self, key: Key, status: agent_pb2.TaskStatus, path: str) -> None:
        try:
            write_file(path, status.SerializeToString())
            self._files[key] = path
        except FileNotFoundError:
            pass  # never staged (refused, say): nothing on disk to recover it from
        except OSError as e:
            log.warning("cannot keep the final report", attempt=key, error=str(e))
            with contextlib.suppress(OSError):  # a part of it would pass for a report
                os.unlink(path)

    def ack(self, ref: agent_pb2.AttemptRef) -> None:
        """The controller has the report: forget it, remove the attempt from the runtime."""
        key = key_of(ref)
        self.unacked.pop(key, None)
        self._unwritten.pop(key, None)
        self._unlink(key)
        handle = self.ended.pop(key, None)
        # A handle with nothing to remove (``needs_remove`` false) costs no task.
        if handle is not None and getattr(handle, "needs_remove", True):
            task = asyncio.create_task(_remove(key, handle), name=f"remove {key}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def forget_cancelled(self, keys: set[Key]) -> None:
        """Remove from the runtime those of ``keys`` that ended CANCELLED, keeping no record.

        Attempts the agent stopped itself on shutdown did not fail: a restarted agent must
        not resend their CANCELLED reports, so that the controller, seeing them gone, retries
        them as lost.
        """
        for key in keys:
            report = self.unacked.get(key)
            handle = self.ended.get(key)
            if report and handle and report.state == t.TaskState.TASK_STATE_CANCELLED:
                del self.ended[key]
                self._unwritten.pop(key, None)
                self._unlink(key)
                await _remove(key, handle)

    def _unlink(self, key: Key) -> None:
        path = self._files.pop(key, None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for removals under way."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)


async def _remove(key: Key, handle: TaskHandle) -> None:
    try:
        await handle.remove()
    except Exception as e:
        log.warning("cannot remove an ended attempt", attempt=key, error=str(e))
