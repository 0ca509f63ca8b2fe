"""What placement sees: read-only views of nodes, ready tasks and running attempts."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from tether.api.v1 import types_pb2
from tether.controller.selectors import Constraints

__all__ = ["DEFAULT_PRIORITY", "MAX_PRIORITY", "NodeView", "Running", "TaskRequest"]

_EPS = 1e-9
DEFAULT_PRIORITY = 50
MAX_PRIORITY = 100
_NO_CONSTRAINTS = Constraints()


@dataclass(frozen=True)
class Running:
    """An attempt bound to a node, as preemption sees it.

    Attributes:
        key: The task's key.
        cpu: CPU it holds.
        memory: Memory it holds, bytes.
        gpus: GPU indices it holds.
        priority: Its task's priority (0-100).
        preemptible: Whether it may be stopped for a task of higher priority.
        started: When it was bound (any clock, the same for all); later is less work lost.
        stopping: Already being stopped (preempted, cancelled): not a victim again.
    """

    key: Hashable
    cpu: float = 0.0
    memory: int = 0
    gpus: tuple[int, ...] = ()
    priority: int = 50
    preemptible: bool = False
    started: float = 0.0
    stopping: bool = False


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """A ready task as placement sees it.

    Attributes:
        key: The caller's key for the task (returned in bindings and reasons).
        cpu: Cores one replica needs.
        memory: Bytes one replica needs.
        gpu: GPU devices one replica needs.
        priority: 0-100; higher is placed first.
        seq: Position in the ready queue (lower became ready earlier).
        ready_at: When it became ready (seconds, the clock of :func:`plan`'s ``now``).
        rank: Longest remaining path to the end of its DAG, seconds (critical-path).
        constraints: Selector and affinity.
        preemptible: May be stopped for a higher-priority task (kept for the record).
        replicas: Gang size: this many distinct nodes at once, or none.
        policy: The workflow's :class:`~tether.controller.policies.Policy`; None takes
            the pass's.
        may_preempt: False while victims chosen earlier are still stopping.
    """

    key: Hashable
    cpu: float = 0.0
    memory: int = 0
    gpu: int = 0
    priority: int = DEFAULT_PRIORITY
    seq: int = 0
    ready_at: float = 0.0
    rank: float = 0.0
    constraints: Constraints = _NO_CONSTRAINTS
    preemptible: bool = False
    replicas: int = 1
    policy: Any = None
    may_preempt: bool = True

    @classmethod
    def of(cls, key: Hashable, r: types_pb2.Resources, **kw) -> TaskRequest:
        """A request for the resources message ``r``."""
        return cls(key, cpu=r.cpu, memory=r.memory_bytes, gpu=r.gpu, **kw)


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement may know of one connected node: capacity, what is held, labels.

    ``max_tasks`` 0 means no limit on the number of attempts.
    """

    name: str
    cpu_total: float = 0.0
    cpu_used: float = 0.0
    memory_total: int = 0
    memory_used: int = 0
    gpu_indices: tuple[int, ...] = ()
    gpus_used: frozenset[int] = frozenset()
    max_tasks: int = 0
    running: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    attempts: tuple[Running, ...] = ()

    @property
    def cpu_free(self) -> float:
        return self.cpu_total - self.cpu_used

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_used

    @property
    def free_gpus(self) -> tuple[int, ...]:
        """Indices of GPUs no attempt holds, in index order."""
        return tuple(i for i in self.gpu_indices if i not in self.gpus_used)

    @property
    def has_slot(self) -> bool:
        """Whether the node may take one more attempt."""
        return self.max_tasks <= 0 or self.running < self.max_tasks

    def fits(self, r: TaskRequest | types_pb2.Resources) -> bool:
        """Whether ``r`` fits in what is free now (CPU, memory, GPUs and a task slot)."""
        cpu, mem, gpu = _shape(r)
        return (
            self.cpu_used + cpu <= self.cpu_total + _EPS
            and self.memory_used + mem <= self.memory_total
            # A count, not the free list: GPUs held on a node that re-registered with fewer
            # still count against it.
            and len(self.gpu_indices) - len(self.gpus_used) >= gpu
            and (self.max_tasks <= 0 or self.running < self.max_tasks)
        )

    def why_not(self, r: TaskRequest | types_pb2.Resources) -> str:
        """What keeps ``r`` off this node now, or ``""`` if it fits."""
        cpu, mem, gpu = _shape(r)
        if not (self.max_tasks <= 0 or self.running < self.max_tasks):
            return f"at its task limit ({self.max_tasks})"
        if self.cpu_used + cpu > self.cpu_total + _EPS:
            return f"cpu: {self.cpu_free:g} free < {cpu:g}"
        if self.memory_used + mem > self.memory_total:
            return f"memory: {self.memory_free} bytes free < {mem}"
        free = len(self.gpu_indices) - len(self.gpus_used)
        if free < gpu:
            return f"gpu: {free} free < {gpu}"
        return ""

    def could_ever_fit(self, r: TaskRequest | types_pb2.Resources) -> bool:
        """Whether ``r`` fits in the node's whole capacity, all else gone."""
        cpu, mem, gpu = _shape(r)
        return (
            cpu <= self.cpu_total + _EPS
            and mem <= self.memory_total
            and gpu <= len(self.gpu_indices)
        )

    def with_bound(self, r: TaskRequest | types_pb2.Resources, gpus: Iterable[int]) -> NodeView:
        """This node after one more attempt of ``r`` holding ``gpus`` was bound to it."""
        cpu, mem, _ = _shape(r)
        gpus = tuple(gpus)
        return NodeView(
            self.name,
            self.cpu_total,
            self.cpu_used + cpu,
            self.memory_total,
            self.memory_used + mem,
            self.gpu_indices,
            self.gpus_used | frozenset(gpus) if gpus else self.gpus_used,
            self.max_tasks,
            self.running + 1,
            self.labels,
            self.attempts,
        )


def _shape(r: TaskRequest | types_pb2.Resources) -> tuple[float, int, int]:
    if isinstance(r, TaskRequest):
        return r.cpu, r.memory, r.gpu
    return r.cpu, r.memory_bytes, r.gpu
