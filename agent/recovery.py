"""Turning what ``runtime.recover()`` finds into attempts this agent watches or reports.

After an agent restart a runtime that keeps work (``docker``) lists the attempts a previous
agent started, by the labels they were started with (see ``launch.labels_of``). A running
one is adopted: watched, cancellable and timed out as if this agent had started it. An ended
one becomes a final report at once; the previous agent's own report (``status.pb``) wins
over what the exit code alone would say, since it may know of a cancel or a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tether.agent import layout
from tether.agent.runtimes.base import RecoveredTask
from tether.agent.supervision import Key, key_of
from tether.api.v1 import agent_pb2
from tether.sdk.telemetry import get_logger

__all__ = ["Found", "found_attempts", "ref_of"]

log = get_logger("agent.runner")


def ref_of(labels: dict[str, str]) -> agent_pb2.AttemptRef | None:
    """The attempt the labels name; None when they are not an attempt's labels."""
    try:
        return agent_pb2.AttemptRef(
            run_id=labels[layout.RUN_LABEL],
            task=labels[layout.TASK_LABEL],
            attempt=int(labels[layout.ATTEMPT_LABEL]),
        )
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Found:
    """One recovered attempt, with what its labels say about it.

    Attributes:
        ref: Which attempt.
        task: What the runtime found.
        timeout: Its task's timeout, seconds (0: none).
        elapsed: How long it has run already, seconds (0: unknown).
        traceparent: The attempt span's context (its task's TRACEPARENT).
        dispatch: The context of that span's parent, the controller's dispatch span ("" for
            attempts started by agents that did not record it).
    """

    ref: agent_pb2.AttemptRef
    task: RecoveredTask
    timeout: float
    elapsed: float
    traceparent: str
    dispatch: str = ""

    def initial_status(self) -> agent_pb2.TaskStatus:
        """The attempt's final report before it ends: who it is and when it started."""
        status = agent_pb2.TaskStatus(ref=self.ref)
        if self.task.started_at:
            status.started_at.FromNanoseconds(int(self.task.started_at * 1e9))
        return status


def found_attempts(found: list[RecoveredTask], known: Callable[[Key], bool]) -> Iterator[Found]:
    """The attempts in ``found`` to adopt or report: labelled as attempts, and not ``known``
    to this agent already."""
    for rt in found:
        ref = ref_of(rt.labels)
        if ref is None or known(key_of(ref)):
            continue
        log.info(
            "recovered attempt",
            run_id=ref.run_id,
            task=ref.task,
            attempt=ref.attempt,
            running=rt.running,
        )
        yield Found(
            ref=ref,
            task=rt,
            timeout=_timeout(rt.labels),
            elapsed=max(0.0, time.time() - rt.started_at) if rt.started_at else 0.0,
            traceparent=rt.labels.get(layout.TRACEPARENT_LABEL, ""),
            dispatch=rt.labels.get(layout.DISPATCH_LABEL, ""),
        )


def _timeout(labels: dict[str, str]) -> float:
    try:
        return float(labels.get(layout.TIMEOUT_LABEL) or 0)
    except ValueError:
        return 0.0
