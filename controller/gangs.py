"""Gangs: a task with ``replicas`` > 1 runs as that many replicas of one attempt, one per
node, placed together (all or nothing), started with the addresses they need to find each
other, and retried whole when one of them fails.

The task record holds the replicas (``TaskRun.replicas``); ``TaskRun.node`` is replica 0's.
These helpers answer "is this attempt on that node" for plain tasks and gangs alike.
"""

from __future__ import annotations

from tether.api.v1 import types_pb2 as t

__all__ = [
    "DEFAULT_MASTER_PORT",
    "gang_env",
    "is_gang",
    "is_on",
    "placements",
    "replica_on",
    "running_on",
]

# torchrun's default, used when replica 0's agent found no free port to report.
DEFAULT_MASTER_PORT = 29500


def is_gang(m: t.TaskRun) -> bool:
    """Whether the task's current attempt is a gang's."""
    return len(m.replicas) > 0


def replica_on(m: t.TaskRun, node: str) -> t.Replica | None:
    """The replica of the current attempt bound to ``node``, if any."""
    for r in m.replicas:
        if r.node == node:
            return r
    return None


def is_on(m: t.TaskRun, node: str) -> bool:
    """Whether the current attempt (or one of its replicas) is bound to ``node``."""
    if m.replicas:
        return replica_on(m, node) is not None
    return m.node == node


def running_on(m: t.TaskRun, node: str) -> bool:
    """Whether the current attempt runs on ``node`` by the controller's record."""
    if m.replicas:
        r = replica_on(m, node)
        return r is not None and r.state == t.TaskState.TASK_STATE_RUNNING
    return m.node == node and m.state == t.TaskState.TASK_STATE_RUNNING


def placements(m: t.TaskRun) -> list[tuple[str, list[int]]]:
    """(node, GPU indices) of each replica of the current attempt (one for a plain task)."""
    if m.replicas:
        return [(r.node, list(r.gpu_indices)) for r in m.replicas]
    gpus = list(m.attempts[-1].gpu_indices) if m.attempts else []
    return [(m.node, gpus)] if m.node else []


def gang_env(m: t.TaskRun, replica: t.Replica) -> dict[str, str]:
    """The environment a replica gets so that ``torchrun`` and similar launchers work."""
    return {
        "TETHER_REPLICA_INDEX": str(replica.index),
        "TETHER_REPLICAS": str(len(m.replicas)),
        "TETHER_MASTER_ADDR": m.master_addr,
        "TETHER_MASTER_PORT": str(m.master_port),
    }
