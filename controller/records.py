"""What the engine caches: task and run records (with their etcd revisions) and agent streams."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller.depends_on import stored_record

__all__ = ["AgentSession", "RunEntry", "TaskEntry", "new_run_id", "now"]

# Most messages, and bytes, sent to an agent as one ControllerBatch (agents take messages of
# up to 64 MiB).
MAX_BATCH = 256
MAX_BATCH_BYTES = 4 * 2**20


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())  # GetCurrentTime goes through a datetime: 4 x slower
    return ts


def new_run_id() -> str:
    """A run id that sorts by creation time: 12 hex digits of ms, then 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


@dataclass(eq=False)
class TaskEntry:
    """A cached task record: the message, its key and last committed mod_revision."""

    key: str
    msg: t.TaskRun
    rev: int
    children: list[str] = field(default_factory=list)
    # The spec with templates rendered for the current attempt (None: same as msg.spec).
    rendered: t.TaskSpec | None = None
    # Upstream tasks not finished yet (kept only while PENDING).
    waiting: int = 0
    # The spec's node_selector and affinity as placement reads them (built once).
    constraints: Any = None
    # Placement's request for this task while it waits READY, kept across passes: a long
    # ready queue is planned again on every pass, and building requests was most of it.
    request: Any = None
    # The record as etcd holds it after this controller's last write or read of it (b"":
    # not known): what reads answer while a change of ``msg`` is on its way to etcd.
    committed: bytes = b""

    def serialize(self) -> bytes:
        return stored_record(self.msg)


@dataclass(eq=False)
class RunEntry:
    """A cached run record with its tasks and how many are not finished."""

    key: str
    msg: t.Run
    rev: int
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    unfinished: int = 0
    # Longest remaining path (seconds) from each task to the end of the DAG, for the
    # critical-path policy; None until the placer first needs it (reset when durations are
    # learned).
    ranks: dict[str, float] | None = None
    # The record as last written by this controller (b"": not known here), with ``rev``.
    committed: bytes = b""

    def serialize(self) -> bytes:
        return self.msg.SerializeToString()


class AgentSession:
    """One connected agent stream: the node it speaks for and what waits to be sent to it.

    Messages queue in a plain list that the stream's writer takes whole: with ``batches``
    (the agent registered with ``Register.batches``) everything queued since the last write
    goes out as one ``ControllerBatch``, so that per-message gRPC costs are paid per batch.
    """

    def __init__(self, node: str, batches: bool = False) -> None:
        self.node = node
        self.batches = batches
        self.closed = False
        self._queued: list[agent_pb2.ControllerMessage] = []
        self._ready = asyncio.Event()

    def send(self, msg: agent_pb2.ControllerMessage) -> None:
        if not self.closed:
            self._queued.append(msg)
            self._ready.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ready.set()

    async def outgoing(self) -> AsyncIterator[agent_pb2.ControllerMessage]:
        """What to write to the stream, in order, until the session is closed."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            # Read before taking the queue: a send() while a write below is suspended is
            # before any later close(), so it is taken (and written) by the next turn.
            closed = self.closed
            queued, self._queued = self._queued, []
            if not self.batches or len(queued) == 1:
                for msg in queued:
                    yield msg
            else:
                for batch in _batches(queued):
                    if len(batch) == 1:
                        yield batch[0]
                    else:
                        yield agent_pb2.ControllerMessage(
                            batch=agent_pb2.ControllerBatch(messages=batch)
                        )
            if closed:
                return


def _batches(
    msgs: list[agent_pb2.ControllerMessage],
) -> Iterator[list[agent_pb2.ControllerMessage]]:
    """``msgs`` cut into batches of at most :data:`MAX_BATCH` messages and, unless one message
    alone is bigger, :data:`MAX_BATCH_BYTES` (assignments carry specs and upstream outputs)."""
    batch: list[agent_pb2.ControllerMessage] = []
    size = 0
    for msg in msgs:
        n = msg.ByteSize()
        if batch and (len(batch) >= MAX_BATCH or size + n > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(msg)
        size += n
    if batch:
        yield batch
