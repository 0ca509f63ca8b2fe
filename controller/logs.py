"""Log streaming through the controller.

Logs stay on the node that ran an attempt (etcd keeps only a 4 KiB tail). ``StreamLogs``
resolves the attempt to its node, sends that node's agent a ``LogRequest`` on its stream, and
relays the ``LogChunk`` messages that come back, matched by ``stream_id``, until the agent
says ``eof``. A client that goes away gets its stream cancelled on the agent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tether.api.v1 import agent_pb2, controller_pb2
from tether.controller import lifecycle as lc
from tether.controller.engine import Engine
from tether.controller.errors import NodeUnavailable, NotFound, ResourceExhausted
from tether.controller.records import AgentSession
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.telemetry import get_logger

__all__ = ["MAX_BUFFERED_BYTES", "LogRouter"]

log = get_logger("controller.logs")

# Bytes of one stream held here for a client that reads slower than its agent sends (the
# protocol has no flow control back to the agent). This is the default cap of one attempt
# log, so one capped stream read by a stalled client (a pager, say) just fits; past it the
# stream fails with RESOURCE_EXHAUSTED rather than letting a client grow the controller.
MAX_BUFFERED_BYTES = 64 * 2**20
# How often a followed task that has not started its attempt yet is looked at again.
_START_POLL = 0.1


@dataclass(eq=False)
class _Stream:
    """One StreamLogs call waiting for its agent's chunks."""

    session: AgentSession
    queue: asyncio.Queue[agent_pb2.LogChunk | Exception] = field(default_factory=asyncio.Queue)
    buffered: int = 0
    failed: bool = False
    # The agent sent its end of file: nothing to cancel on its side.
    ended: bool = False

    def fail(self, error: Exception) -> None:
        if not self.failed:
            self.failed = True
            self.queue.put_nowait(error)


class LogRouter:
    """Routes attempt logs from agents to ``StreamLogs`` callers, by stream id.

    Args:
        max_buffered_bytes: Most bytes held for one stream whose client reads slowly.
    """

    def __init__(self, max_buffered_bytes: int = MAX_BUFFERED_BYTES) -> None:
        self.max_buffered_bytes = max_buffered_bytes
        self._streams: dict[str, _Stream] = {}

    @property
    def active(self) -> set[str]:
        """The ids of the log streams open now."""
        return set(self._streams)

    def on_chunk(self, session: AgentSession, chunk: agent_pb2.LogChunk) -> None:
        """Hand over a chunk an agent sent. Never blocks: it runs in the agent's read loop."""
        s = self._streams.get(chunk.stream_id)
        # Chunks of a stream that already ended, or from another node than the one asked.
        if s is None or s.session is not session or s.failed:
            return
        if s.buffered + len(chunk.data) > self.max_buffered_bytes:
            log.warning("log client too slow", stream_id=chunk.stream_id, node=session.node)
            s.fail(
                ResourceExhausted(
                    f"log stream fell more than {self.max_buffered_bytes} bytes behind its "
                    "node; read faster, or ask for one stream (--stdout-only/--stderr-only)"
                )
            )
            return
        s.buffered += len(chunk.data)
        s.queue.put_nowait(chunk)

    def disconnected(self, session: AgentSession) -> None:
        """An agent's stream ended: the log streams it was answering end with UNAVAILABLE."""
        for s in self._streams.values():
            if s.session is session:
                s.fail(
                    NodeUnavailable(
                        f"node {session.node} disconnected while sending logs; try again"
                    )
                )

    async def stream(
        self,
        current_engine: Callable[[], Engine],
        run_id: str,
        task: str,
        attempt: int = 0,
        follow: bool = False,
    ) -> AsyncIterator[controller_pb2.LogData]:
        """Yield the logs of one attempt of a task, from the node that ran it.

        Args:
            current_engine: Returns the engine of the current leadership term (raising
                ``NotLeader`` when there is none); asked again while waiting for an attempt
                to start, so that a stream never waits on a term that is over.
            run_id: The run.
            task: The task's name.
            attempt: Attempt number; 0 is the task's current attempt.
            follow: Keep streaming until the attempt ends. Following a task that has no
                attempt running yet waits for it to start.

        Raises:
            InvalidSpecError: ``run_id`` or ``task`` is empty, or ``attempt`` < 0.
            NotFound: no such run, task or attempt, or the node no longer has the logs.
            NodeUnavailable: the node that ran the attempt is not connected.
            NotLeader: this controller is standing by.
            ResourceExhausted: the caller read too slowly (see ``max_buffered_bytes``).
        """
        _check_request(run_id, task, attempt)
        found = await self._resolve(current_engine, run_id, task, attempt, follow)
        if found is None:
            return  # the attempt has not started: nothing is logged yet
        number, node = found
        session = current_engine().session_of(node)
        if session is None:
            raise NodeUnavailable(
                f"node {node} is not connected; the logs of attempt {number} of task "
                f"{task!r} are on it"
            )
        stream_id = uuid.uuid4().hex
        s = _Stream(session)
        self._streams[stream_id] = s
        try:
            session.send(
                agent_pb2.ControllerMessage(
                    logs=agent_pb2.LogRequest(
                        stream_id=stream_id,
                        ref=agent_pb2.AttemptRef(run_id=run_id, task=task, attempt=number),
                        follow=follow,
                    )
                )
            )
            async for data in _relay(s, number):
                yield data
        finally:
            del self._streams[stream_id]
            if not s.ended:
                # The client went away (or fell behind): the agent can stop reading.
                session.send(
                    agent_pb2.ControllerMessage(
                        logs_cancel=agent_pb2.LogCancel(stream_id=stream_id)
                    )
                )

    async def _resolve(
        self,
        current_engine: Callable[[], Engine],
        run_id: str,
        task: str,
        attempt: int,
        follow: bool,
    ) -> tuple[int, str] | None:
        """The attempt number and its node; None for an attempt that has not started yet
        (without ``follow``; with it, wait for the attempt to start)."""
        while True:
            tr = await current_engine().get_task(run_id, task)
            number = attempt or tr.attempt
            if number == 0:
                if not follow or tr.state in lc.TASK_TERMINAL:
                    raise NotFound(
                        f"task {task!r} of run {run_id} has no attempt yet "
                        f"({lc.task_state_name(tr.state)})"
                    )
            else:
                att = next((a for a in tr.attempts if a.number == number), None)
                if att is None:
                    raise NotFound(
                        f"task {task!r} of run {run_id} has no attempt {number} "
                        f"(it has {tr.attempt})"
                    )
                if att.state != lc.SCHEDULED:
                    return number, att.node
                # Bound to a node, but its agent may not have the assignment yet.
                if not follow:
                    return None
            await asyncio.sleep(_START_POLL)


def _check_request(run_id: str, task: str, attempt: int) -> None:
    problems = []
    if not run_id:
        problems.append(FieldViolation("run_id", "must not be empty"))
    if not task:
        problems.append(FieldViolation("task", "must not be empty"))
    if attempt < 0:
        problems.append(FieldViolation("attempt", "must be >= 0 (0: the current attempt)"))
    if problems:
        raise InvalidSpecError(problems)


async def _relay(s: _Stream, number: int) -> AsyncIterator[controller_pb2.LogData]:
    """The stream's chunks as LogData, until the agent's end of file (or its error)."""
    while True:
        item = await s.queue.get()
        if isinstance(item, Exception):
            raise item
        s.buffered -= len(item.data)
        if item.data:
            yield controller_pb2.LogData(stream=item.stream, data=item.data, attempt=number)
        if item.eof:
            s.ended = True
            if item.error:
                raise NotFound(item.error)
            return
