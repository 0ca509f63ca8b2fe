"""The open-loop offered-load measurement and percentile the peer baselines share.

Imports nothing from Tether: ``ray_baseline.py`` and ``dask_baseline.py`` run with another
Python (the one that has Ray or Dask) and find this module beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def offer(
    submit: Callable[[int], Iterable[Hashable]],
    collect: Callable[[dict, list[float], float], None],
    level: float,
    seconds: float,
    tick: float,
) -> dict:
    """Offer ``level`` tasks/s in batches every ``tick`` s for ``seconds``, then wait for all.

    ``submit(n)`` starts ``n`` no-op tasks and returns their handles; ``collect(pending,
    latencies, timeout)`` waits at most ``timeout`` s, removes the handles that are done from
    ``pending`` (handle -> submit time, ``time.perf_counter()``) and appends their latencies,
    in ms, to ``latencies``.
    """
    batch = max(1, round(level * tick))
    ticks = max(1, round(seconds / tick))
    pending: dict = {}
    latencies: list[float] = []
    start = time.perf_counter()
    for i in range(ticks):
        at = time.perf_counter()
        for handle in submit(batch):
            pending[handle] = at
        while (left := start + (i + 1) * tick - time.perf_counter()) > 0:
            if pending:
                collect(pending, latencies, min(left, 0.005))
            else:  # all done before the next batch is due
                time.sleep(min(left, 0.005))
    offered_for = time.perf_counter() - start
    while pending:
        collect(pending, latencies, 0.005)
    elapsed = time.perf_counter() - start
    tasks = batch * ticks
    return {
        "level": level,
        "offered_tasks_per_s": round(tasks / max(offered_for, tick * ticks), 1),
        "achieved_tasks_per_s": round(tasks / elapsed, 1),
        "latency_ms_p50": round(pct(latencies, 50), 2),
        "latency_ms_p99": round(pct(latencies, 99), 2),
        "tasks": tasks,
    }
