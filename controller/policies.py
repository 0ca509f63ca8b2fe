"""Placement policies: the order in which a policy tries nodes, and whether it orders ready
tasks by their critical path.

A policy's :meth:`Policy.node_key` depends on the node alone (not on the task), so a pass can
keep nodes sorted by it and find the best fitting node without scoring every node for every
task; ties go to the earlier node name.
"""

from __future__ import annotations

from typing import Protocol

from tether.controller.views import NodeView

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Binpack",
    "CriticalPath",
    "Fifo",
    "LeastConnections",
    "Policy",
    "Spread",
    "get_policy",
]


class Policy(Protocol):
    """A placement policy.

    Attributes:
        name: What ``--policy`` and ``scheduling.policy`` call it.
        ranks: Whether ready tasks of equal priority go longest-remaining-path first (else
            in the order they became ready).
    """

    name: str
    ranks: bool

    def node_key(self, node: NodeView) -> float:
        """How this policy orders nodes: lower is tried first."""
        ...


def allocated_fraction(node: NodeView) -> float:
    """Mean share of the node's CPU and memory that attempts hold (0 empty .. 1 full)."""
    parts = 0
    total = 0.0
    if node.cpu_total > 0:
        total += node.cpu_used / node.cpu_total
        parts += 1
    if node.memory_total > 0:
        total += node.memory_used / node.memory_total
        parts += 1
    return total / parts if parts else 0.0


class Binpack:
    """Most-allocated node first: fills nodes up and keeps whole (and big) nodes free."""

    name = "binpack"
    ranks = False

    def node_key(self, node: NodeView) -> float:
        """Fuller nodes first."""
        return -allocated_fraction(node)


class Spread:
    """Least-allocated node first: load spread evenly, a node failure hits few tasks."""

    name = "spread"
    ranks = False

    def node_key(self, node: NodeView) -> float:
        """Emptier nodes first."""
        return allocated_fraction(node)


class Fifo:
    """Ready tasks strictly in the order they became ready, each on the first fitting node
    in name order."""

    name = "fifo"
    ranks = False

    def node_key(self, node: NodeView) -> float:
        """Every node the same: the name order decides."""
        return 0.0


class LeastConnections:
    """The node with the fewest running attempts first."""

    name = "least-connections"
    ranks = False

    def node_key(self, node: NodeView) -> float:
        """Fewer attempts first."""
        return float(node.running)


class CriticalPath:
    """Ready tasks with the longest remaining path to the end of their DAG first (declared
    ``expected_duration``, else learned durations); each on the least-allocated node, so
    that the tasks that decide the makespan run where they compete least."""

    name = "critical-path"
    ranks = True

    def node_key(self, node: NodeView) -> float:
        """Emptier nodes first."""
        return allocated_fraction(node)


POLICIES: dict[str, Policy] = {
    p.name: p for p in (Binpack(), Spread(), Fifo(), LeastConnections(), CriticalPath())
}
# The name of the one policy of earlier releases, kept so that their configs and scripts
# work: ready tasks in order, each on the first fitting node in name order — fifo.
POLICIES["first-fit"] = POLICIES["fifo"]
# Shortest makespan for DAGs (the workloads Tether runs) and, with no durations declared or
# learned yet, still deepest-chain-first; see the README's "Scheduling" section.
DEFAULT_POLICY = CriticalPath.name


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
