"""Critical paths of a workflow's DAG: how long from the start of each task to the end of the
run, if every task took its expected time. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_SECONDS", "remaining_paths"]

# What a task with no declared and no learned duration is taken to last: every task the
# same, so the path counts tasks (the deepest chain still goes first).
DEFAULT_SECONDS = 1.0


def remaining_paths(
    durations: Mapping[str, float], depends_on: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """For each task, its duration plus the longest remaining path of the tasks that
    depend on it (seconds); one pass in reverse topological order, O(tasks + edges)."""
    children: dict[str, list[str]] = {n: [] for n in durations}
    pending = {n: 0 for n in durations}
    for n, deps in depends_on.items():
        for d in deps:
            if d in children and n in pending:
                children[d].append(n)
                pending[d] += 1
    # Leaves first: a task's rank is known once all its children's are.
    stack = [n for n, c in pending.items() if c == 0]
    rank: dict[str, float] = {}
    while stack:
        n = stack.pop()
        rank[n] = durations[n] + max((rank[c] for c in children[n]), default=0.0)
        for d in depends_on.get(n, ()):
            if d in pending:
                pending[d] -= 1
                if pending[d] == 0:
                    stack.append(d)
    return rank
