"""Placement: which node gets each ready task. Pure functions over read-only node views.

A policy filters the nodes that can hold a task, then scores them; :func:`plan` places ready
tasks in queue order, each on the best-scoring node (ties go to the earlier name), and charges
what it placed to that node before placing the next. Policies live in :data:`POLICIES`; the
controller's ``policy`` setting names one. Nothing here knows about etcd, gRPC or asyncio, so
placement is tested without a server.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from tether.api.v1 import types_pb2

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Binding",
    "FirstFit",
    "NodeView",
    "Plan",
    "Policy",
    "get_policy",
    "never_fits",
    "plan",
]

_EPS = 1e-9


@dataclass(frozen=True)
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

    def fits(self, r: types_pb2.Resources) -> bool:
        """Whether ``r`` fits in what is free now (CPU, memory, GPUs and a task slot)."""
        return (
            self.cpu_used + r.cpu <= self.cpu_total + _EPS
            and self.memory_used + r.memory_bytes <= self.memory_total
            # A count, not the free list: GPUs held on a node that re-registered with fewer
            # still count against it.
            and len(self.gpu_indices) - len(self.gpus_used) >= r.gpu
            and self.has_slot
        )

    def why_not(self, r: types_pb2.Resources) -> str:
        """What keeps ``r`` off this node now, or ``""`` if it fits."""
        if not self.has_slot:
            return f"at its task limit ({self.max_tasks})"
        if self.cpu_used + r.cpu > self.cpu_total + _EPS:
            return f"cpu: {self.cpu_free:g} free < {r.cpu:g}"
        if self.memory_used + r.memory_bytes > self.memory_total:
            return f"memory: {self.memory_free} bytes free < {r.memory_bytes}"
        free = len(self.gpu_indices) - len(self.gpus_used)
        if free < r.gpu:
            return f"gpu: {free} free < {r.gpu}"
        return ""

    def could_ever_fit(self, r: types_pb2.Resources) -> bool:
        """Whether ``r`` fits in the node's whole capacity, all else gone."""
        return (
            r.cpu <= self.cpu_total + _EPS
            and r.memory_bytes <= self.memory_total
            and r.gpu <= len(self.gpu_indices)
        )

    def with_bound(self, r: types_pb2.Resources, gpus: Iterable[int]) -> NodeView:
        """This node after one more attempt of ``r`` holding ``gpus`` was bound to it."""
        return replace(
            self,
            cpu_used=self.cpu_used + r.cpu,
            memory_used=self.memory_used + r.memory_bytes,
            gpus_used=self.gpus_used | frozenset(gpus),
            running=self.running + 1,
        )


class Policy(Protocol):
    """A placement policy: which nodes can take a task, and how good each one is."""

    name: str

    def filter(self, request: types_pb2.Resources, node: NodeView) -> bool:
        """Whether ``node`` can hold ``request`` now."""
        ...

    def score(self, request: types_pb2.Resources, node: NodeView) -> float:
        """How much this policy likes ``node`` for ``request``; higher wins."""
        ...


class FirstFit:
    """Nodes in name order; the first with enough free CPU, memory, GPUs and slots wins."""

    name = "first-fit"

    def filter(self, request: types_pb2.Resources, node: NodeView) -> bool:
        """Whether ``node`` has room for ``request`` now."""
        return node.fits(request)

    def score(self, request: types_pb2.Resources, node: NodeView) -> float:
        """Every node scores the same, so the name order decides."""
        return 0.0


DEFAULT_POLICY = FirstFit.name
POLICIES: dict[str, Policy] = {FirstFit.name: FirstFit()}


def get_policy(name: str) -> Policy:
    """The registered policy called ``name``.

    Raises:
        ValueError: no policy has that name.
    """
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown placement policy {name!r}; known: {known}") from None


# Most rejected nodes a binding lists (its scheduling span shows them).
MAX_REJECTED = 16


@dataclass(frozen=True)
class Binding:
    """One placed task: its key, the node chosen and the GPU indices it gets there, and
    (at most :data:`MAX_REJECTED` of) the nodes the policy turned down, with why."""

    key: Hashable
    node: str
    gpu_indices: tuple[int, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    """The outcome of one placement pass.

    Attributes:
        bindings: Placed tasks, in queue order.
        reasons: Why a task that was not placed cannot be, for tasks no node can ever hold
            (or when no node is connected). Tasks that only wait for capacity to free up, or
            that were not tried because every node is at its task limit, have no entry.
    """

    bindings: list[Binding] = field(default_factory=list)
    reasons: dict[Hashable, str] = field(default_factory=dict)


def plan(
    ready: Sequence[tuple[Hashable, types_pb2.Resources]],
    nodes: Iterable[NodeView],
    policy: Policy,
) -> Plan:
    """Place ``ready`` tasks (key and resources, in queue order) on connected ``nodes``.

    Resources bound earlier in the pass count against later tasks. Once a resource shape
    found no node, later tasks of that shape are not tried again in this pass; once no node
    has a free task slot, the pass ends.
    """
    views = {n.name: n for n in sorted(nodes, key=lambda n: n.name)}
    out = Plan()
    unplaceable: dict[tuple[float, int, int], str] = {}

    def slots_left() -> bool:
        return any(n.has_slot for n in views.values())

    if not ready or not slots_left():
        return out
    for key, r in ready:
        shape = (r.cpu, r.memory_bytes, r.gpu)
        if shape in unplaceable:
            if unplaceable[shape]:
                out.reasons[key] = unplaceable[shape]
            continue
        node, rejected = _choose(r, views.values(), policy)
        if node is None:
            if not slots_left():
                break
            why = unplaceable[shape] = never_fits(r, views.values())
            if why:
                out.reasons[key] = why
            continue
        gpus = node.free_gpus[: r.gpu]
        out.bindings.append(Binding(key, node.name, gpus, rejected))
        views[node.name] = node.with_bound(r, gpus)
    return out


def _choose(
    r: types_pb2.Resources, nodes: Iterable[NodeView], policy: Policy
) -> tuple[NodeView | None, tuple[tuple[str, str], ...]]:
    """The best node for ``r`` (None: none fits) and the nodes the filter turned down."""
    best, best_score = None, 0.0
    rejected: list[tuple[str, str]] = []
    for node in nodes:
        if not policy.filter(r, node):
            if len(rejected) < MAX_REJECTED:
                rejected.append((node.name, node.why_not(r) or f"refused by {policy.name}"))
            continue
        score = policy.score(r, node)
        if best is None or score > best_score:
            best, best_score = node, score
    return best, tuple(rejected)


def never_fits(request: types_pb2.Resources, nodes: Iterable[NodeView]) -> str:
    """Explain why no connected node could ever hold ``request``, or return ``""``."""
    live = list(nodes)
    if not live:
        return "no nodes are connected"
    if any(n.could_ever_fit(request) for n in live):
        return ""
    from tether.sdk.quantities import format_memory

    return (
        f"no node can ever hold cpu={request.cpu:g} memory={format_memory(request.memory_bytes)} "
        f"gpu={request.gpu}"
    )
