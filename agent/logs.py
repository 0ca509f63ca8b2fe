"""Answers the controller's LogRequests: sends an attempt's log files as LogChunk messages.

Each attempt keeps ``stdout.log`` and ``stderr.log`` in ``<work_dir>/<run>/<task>/<attempt>/``
(written by the runtime, capped at ``AgentConfig.log_limit_bytes``). A request reads both from
the start; with ``follow`` it keeps tailing them while the runner still runs the attempt, then
sends the rest. Every answer ends with one ``eof`` chunk, carrying ``error`` when the attempt's
logs are not on this node. Each request is its own task, so a slow or endless stream never
holds up the agent's receive loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from tether.agent import layout
from tether.api.v1 import agent_pb2
from tether.sdk.quantities import format_duration
from tether.sdk.telemetry import get_logger

__all__ = ["CHUNK_BYTES", "LogStreams"]

log = get_logger("agent.logs")

# LogChunk.data is at most this long (agent.proto).
CHUNK_BYTES = 64 * 1024
# How often a followed attempt's files are checked for new output.
POLL_INTERVAL = 0.1
# Log chunks share the stream with heartbeats and status reports: a log stream waits while
# this many messages are queued for the controller, so a big log never delays the heartbeats
# by more than a few chunks nor piles up in memory.
_MAX_QUEUED = 8
_CHUNKS_PER_TURN = 4
_STREAMS = ("stdout", "stderr")


class _Tail:
    """Reads a file from where the last read stopped; a file not there yet reads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def open(self) -> None:
        """Open the file if it is there and not open yet."""
        if self._file is None:
            # Not there yet, or not a regular file (a task's link or FIFO): reads as empty.
            with contextlib.suppress(OSError):
                self._file = layout.open_task_file(self.path, "r")

    def read(self, size: int) -> bytes:
        self.open()
        return self._file.read(size) if self._file is not None else b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class LogStreams:
    """The log streams this agent is sending, by ``stream_id``.

    Args:
        work_dir: The agent's work directory, holding ``<run>/<task>/<attempt>/``.
        is_running: Whether the runner still runs an attempt; a followed stream ends once
            this turns false (by then the runtime has written all of the attempt's output).
        node: This node's name, for error messages.
        poll_interval: Seconds between checks of a followed attempt's files.
        retention: The agent's ``work_retention`` (0: none), named when logs are missing.
    """

    def __init__(
        self,
        work_dir: Path,
        is_running: Callable[[agent_pb2.AttemptRef], bool],
        node: str,
        poll_interval: float = POLL_INTERVAL,
        retention: float = 0.0,
    ) -> None:
        self.work_dir = work_dir
        self.is_running = is_running
        self.node = node
        self.poll_interval = poll_interval
        self.retention = retention
        self._tasks: dict[str, asyncio.Task] = {}

    @property
    def active(self) -> set[str]:
        """The ids of the streams being sent now."""
        return set(self._tasks)

    def start(self, request: agent_pb2.LogRequest, outbox: asyncio.Queue) -> None:
        """Answer ``request`` with LogChunk messages put on ``outbox`` (in the background).

        A second request with the id of a stream still being sent is ignored.
        """
        sid = request.stream_id
        if sid in self._tasks:
            return
        task = asyncio.create_task(self._send(request, outbox), name=f"logs {sid}")
        self._tasks[sid] = task
        task.add_done_callback(functools.partial(self._forget, sid))

    def _forget(self, stream_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(stream_id) is task:
            del self._tasks[stream_id]

    def cancel(self, stream_id: str) -> None:
        """Stop sending a stream (LogCancel: its client went away); unknown ids are ignored."""
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        """Stop every stream: the connection they were answering is gone."""
        for sid in list(self._tasks):
            self.cancel(sid)

    def attempt_dir(self, ref: agent_pb2.AttemptRef) -> Path | None:
        """Where an attempt's files are kept; None for a ref that names no attempt directory."""
        for part in (ref.run_id, ref.task):
            if not part or part in (".", "..") or "/" in part or "\0" in part:
                return None
        if ref.attempt < 1:
            return None
        return self.work_dir / ref.run_id / ref.task / str(ref.attempt)

    async def _send(self, req: agent_pb2.LogRequest, outbox: asyncio.Queue) -> None:
        def put(**chunk) -> None:
            outbox.put_nowait(
                agent_pb2.AgentMessage(
                    log_chunk=agent_pb2.LogChunk(stream_id=req.stream_id, **chunk)
                )
            )

        async def room() -> None:
            # Let other tasks run, then wait while the outbox is full.
            await asyncio.sleep(0)
            while outbox.qsize() >= _MAX_QUEUED:
                await asyncio.sleep(0.005)

        try:
            await self._send_files(req, put, room)
        except Exception as e:
            # Whatever went wrong, the controller's stream must end rather than wait forever.
            log.exception("log stream failed", stream_id=req.stream_id)
            put(eof=True, error=f"agent error while reading logs on node {self.node}: {e}")

    async def _send_files(
        self,
        req: agent_pb2.LogRequest,
        put: Callable[..., None],
        room: Callable[[], Awaitable[None]],
    ) -> None:
        ref = req.ref
        where = f"attempt {ref.attempt} of task {ref.task!r} (run {ref.run_id})"
        d = self.attempt_dir(ref)
        # An attempt the runner has accepted may not have its directory yet (it is starting).
        if d is None or not (d.is_dir() or self.is_running(ref)):
            why = ""
            if self.retention:
                why = (
                    f" (it removes a run's files {format_duration(self.retention)} after "
                    "their last change: work_retention)"
                )
            put(eof=True, error=f"no logs of {where} on node {self.node}{why}")
            return
        tails = [(name, _Tail(d / f"{name}.log")) for name in _STREAMS]
        # Opened before the first await: the work dir's cleaner (work_retention) renames a
        # finished run's directory from this loop, and open files read on after that.
        for _, tail in tails:
            tail.open()
        try:
            while True:
                # Asked before reading: once the attempt is over, a read that finds nothing
                # new means everything was sent.
                more = req.follow and self.is_running(ref)
                sent = False
                for name, tail in tails:
                    # A few chunks of each in turn, so a busy stdout does not hold up stderr.
                    for _ in range(_CHUNKS_PER_TURN):
                        data = tail.read(CHUNK_BYTES)
                        if not data:
                            break
                        put(stream=name, data=data)
                        sent = True
                        await room()
                if sent:
                    continue
                if not more:
                    break
                await asyncio.sleep(self.poll_interval)
        except OSError as e:
            log.warning("cannot read logs", stream_id=req.stream_id, error=str(e))
            put(eof=True, error=f"cannot read the logs of {where} on node {self.node}: {e}")
            return
        finally:
            for _, tail in tails:
                with contextlib.suppress(OSError):
                    tail.close()
        put(eof=True)
