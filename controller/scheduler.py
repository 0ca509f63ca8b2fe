"""Placement: which node gets a ready task. Pure functions over :class:`NodeState`.

The first policy is first-fit: nodes in name order, the first with enough free CPU, memory,
GPUs and task slots wins. Filter (fits) and choose (first) are separate so that scoring
policies (binpack, spread, critical-path) slot in later without touching the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tether.api.v1 import types_pb2

__all__ = ["NodeState", "Placement", "first_fit", "never_fits"]

_EPS = 1e-9


@dataclass
class NodeState:
    """What the engine knows of one node: capacity, what is bound to it, and its stream."""

    name: str
    capacity: types_pb2.Resources = field(default_factory=types_pb2.Resources)
    gpu_indices: list[int] = field(default_factory=list)
    max_tasks: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    cpu_used: float = 0.0
    memory_used: int = 0
    gpus_used: set[int] = field(default_factory=set)
    attempts: set[tuple[str, str]] = field(default_factory=set)
    session: object | None = None
    lease_id: int = 0
    # When the agent last beat (time.monotonic()); 0 before its first.
    last_heartbeat: float = 0.0
    # Attempts RUNNING here that the agent's last heartbeat did not list.
    unlisted: set[tuple[str, str, int]] = field(default_factory=set)

    @property
    def schedulable(self) -> bool:
        return self.session is not None

    def fits(self, r: types_pb2.Resources) -> bool:
        return (
            self.cpu_used + r.cpu <= self.capacity.cpu + _EPS
            and self.memory_used + r.memory_bytes <= self.capacity.memory_bytes
            and len(self.gpu_indices) - len(self.gpus_used) >= r.gpu
            and (self.max_tasks <= 0 or len(self.attempts) < self.max_tasks)
        )

    def could_ever_fit(self, r: types_pb2.Resources) -> bool:
        return (
            r.cpu <= self.capacity.cpu + _EPS
            and r.memory_bytes <= self.capacity.memory_bytes
            and r.gpu <= len(self.gpu_indices)
        )

    def free_gpus(self, n: int) -> list[int]:
        return [i for i in self.gpu_indices if i not in self.gpus_used][:n]

    def allocated(self) -> types_pb2.Resources:
        return types_pb2.Resources(
            cpu=self.cpu_used, memory_bytes=self.memory_used, gpu=len(self.gpus_used)
        )


@dataclass(frozen=True)
class Placement:
    node: NodeState
    gpu_indices: list[int]


def first_fit(request: types_pb2.Resources, nodes: Iterable[NodeState]) -> Placement | None:
    """Return the first schedulable node (in the given order) that can hold ``request``."""
    for node in nodes:
        if node.schedulable and node.fits(request):
            return Placement(node, node.free_gpus(request.gpu))
    return None


def never_fits(request: types_pb2.Resources, nodes: Iterable[NodeState]) -> str:
    """Explain why no connected node could ever hold ``request``, or return ``""``."""
    live = [n for n in nodes if n.schedulable]
    if not live:
        return "no nodes are connected"
    if any(n.could_ever_fit(request) for n in live):
        return ""
    from tether.sdk.quantities import format_memory

    return (
        f"no node can ever hold cpu={request.cpu:g} memory={format_memory(request.memory_bytes)} "
        f"gpu={request.gpu}"
    )
