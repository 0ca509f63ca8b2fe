"""What the engine caches: task and run records (with their etcd revisions) and agent streams."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller.depends_on import stored_record

__all__ = ["AgentSession", "RunEntry", "TaskEntry", "new_run_id", "now"]


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
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

    def serialize(self) -> bytes:
        return self.msg.SerializeToString()


class AgentSession:
    """One connected agent stream: the node it speaks for and its outgoing queue."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.outbox: asyncio.Queue[agent_pb2.ControllerMessage | None] = asyncio.Queue()
        self.closed = False

    def send(self, msg: agent_pb2.ControllerMessage) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)
