"""Watching a started attempt until it ends: exit, timeout, or cancel with a grace period.

The result goes into the attempt's ``TaskStatus``: state, reason, exit code, output and the
tails of its logs. Whether the attempt was started by this agent or recovered from a
previous one makes no difference here, except for how long it has run already.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from tether.agent import layout
from tether.agent.launch import read_output, tail
from tether.agent.runtimes.base import ExitStatus, TaskHandle
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.states import FENCED

__all__ = ["DEFAULT_CANCEL_GRACE", "Attempt", "Key", "key_of", "now", "supervise"]

# The grace of a CancelTask that names none, seconds.
DEFAULT_CANCEL_GRACE = 10.0

Key = tuple[str, str, int]


def key_of(ref: agent_pb2.AttemptRef) -> Key:
    """The attempt's identity as a dictionary key."""
    return (ref.run_id, ref.task, ref.attempt)


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())  # GetCurrentTime goes through a datetime: 4 x slower
    return ts


@dataclass
class Attempt:
    """One attempt assigned to or adopted by this agent and not over yet.

    Attributes:
        ref: Which attempt.
        task: The asyncio task running and watching it.
        handle: The runtime's handle, once started.
        cancel_reason: Why it is being cancelled (the final report's message).
        cancel_grace: SIGTERM-to-SIGKILL grace of the cancel, seconds.
        cancelled: Set to have the supervisor stop the attempt.
        dir: Its directory on this node, once known.
    """

    ref: agent_pb2.AttemptRef
    task: asyncio.Task | None = None
    handle: TaskHandle | None = None
    cancel_reason: str = ""
    cancel_grace: float = DEFAULT_CANCEL_GRACE
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    dir: str | None = None
    # Stopped for the node's sake (FENCED: out of contact; DRAINED: a drain): reported FAILED
    # with that reason rather than CANCELLED, and retried elsewhere free of charge.
    node_reason: str = ""
    # Wakes the supervisor, while one waits (see supervise).
    wake: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def request_cancel(self, reason: str, grace: float) -> None:
        """Have the supervisor stop the attempt and report it cancelled with ``reason``."""
        self.cancel_reason = reason
        self.cancel_grace = grace
        self.cancelled.set()
        if self.wake is not None:
            self.wake()

    def fence(self, reason: str, grace: float, code: str = FENCED) -> None:
        """Stop the attempt for the node's sake (``code``: FENCED or DRAINED); the controller
        retries it elsewhere."""
        if not self.cancelled.is_set():
            self.node_reason = code
            self.request_cancel(reason, grace)


async def supervise(
    att: Attempt,
    status: agent_pb2.TaskStatus,
    *,
    timeout: float,
    elapsed: float,
    stop_grace: float,
    d: str,
    phase: Callable[[str], AbstractContextManager] = lambda _name: contextlib.nullcontext(),
) -> None:
    """Wait for a started attempt to end, be cancelled or time out; fill in ``status``.

    Args:
        att: The attempt; its ``handle`` is set.
        status: The final report to fill in.
        timeout: The task's timeout, seconds; 0 means none.
        elapsed: How long the attempt has run already (a recovered one), seconds.
        stop_grace: The grace of a stop on timeout, seconds.
        d: The attempt directory (output and log files).
        phase: Wraps the steps "wait" and "outputs" (the runner makes each a span).

    Cancelling the calling task lets go of the attempt without stopping it: it keeps
    running in the runtime for the next agent to adopt.
    """
    assert att.handle is not None
    loop = asyncio.get_running_loop()
    # A handle that shows its exit as a future is waited on through it: no task of its own
    # for wait(), which then returns at once, at hundreds of attempts a second.
    exited = getattr(att.handle, "exit_future", None)
    wait = exited if exited is not None else asyncio.ensure_future(att.handle.wait())
    # One future woken by whichever comes first: the end, a cancel, the timeout. Cheaper than
    # a task per event and asyncio.wait.
    woken = loop.create_future()

    def wake(_f: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    wait.add_done_callback(wake)
    att.wake = wake
    timer = loop.call_later(max(0.0, timeout - elapsed), wake) if timeout else None
    if att.cancelled.is_set():
        wake()
    started = time.monotonic() - elapsed
    try:
        with phase("wait"):
            await woken
    except asyncio.CancelledError:
        if exited is None:
            wait.cancel()
        raise
    finally:
        att.wake = None
        if timer is not None:
            timer.cancel()
    status.stdout_tail = ""
    printed = True
    if wait.done():
        result = await att.handle.wait() if exited is not None else wait.result()
        printed = result.printed
        with phase("outputs"):
            _ended(result, status, d)
    else:
        cancelled = att.cancelled.is_set()
        await att.handle.stop(att.cancel_grace if cancelled else stop_grace)
        status.exit_code = (await att.handle.wait() if exited is not None else await wait).exit_code
        if cancelled and att.node_reason:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason, status.message = att.node_reason, att.cancel_reason
        elif cancelled:
            status.state = t.TaskState.TASK_STATE_CANCELLED
            status.reason, status.message = "cancelled", att.cancel_reason
        else:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason = "timeout"
            status.message = (
                f"killed after {time.monotonic() - started:.1f}s (timeout {timeout:g}s)"
            )
    status.finished_at.CopyFrom(now())
    if printed:
        status.stdout_tail = tail(f"{d}/{layout.STDOUT_FILE}")
        status.stderr_tail = tail(f"{d}/{layout.STDERR_FILE}")


def _ended(result: ExitStatus, status: agent_pb2.TaskStatus, d: str) -> None:
    """The attempt ended by itself: a clean exit is judged by its output file."""
    status.exit_code = result.exit_code
    if result.exit_code == 0 and not result.reason:
        read_output(f"{d}/{layout.OUTPUT_FILE}", status)
    else:
        status.state = t.TaskState.TASK_STATE_FAILED
        status.reason = result.reason or "exit_code"
        status.message = result.message or f"exited with code {result.exit_code}"
