"""Choosing preemption victims: which ``preemptible`` attempts to stop so that a task of
higher priority fits. Pure; the placer stops the chosen attempts (they end PREEMPTED and are
retried without using up their ``retries``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tether.controller.views import NodeView, Running, TaskRequest

__all__ = ["Victims", "choose_victims", "value"]

_EPS = 1e-9


def value(r: Running) -> tuple[int, float]:
    """How much stopping ``r`` costs; victims are taken least valuable first: lower
    priority, then the most recently started (the least work thrown away)."""
    return (r.priority, -r.started)


@dataclass(frozen=True)
class Victims:
    """The attempts to stop on ``node`` so that the task fits there."""

    node: str
    victims: tuple[Running, ...]


def _fits_after(req: TaskRequest, node: NodeView, freed: Iterable[Running]) -> bool:
    cpu = node.cpu_free
    mem = node.memory_free
    gpus = len(node.gpu_indices) - len(node.gpus_used)
    slots = 1 if node.has_slot else 0
    for r in freed:
        cpu += r.cpu
        mem += r.memory
        gpus += len(r.gpus)
        slots += 1
    return req.cpu <= cpu + _EPS and req.memory <= mem and req.gpu <= gpus and slots > 0


def choose_victims(req: TaskRequest, nodes: Iterable[NodeView]) -> Victims | None:
    """The cheapest set of victims on one of ``nodes`` that makes room for ``req``.

    Only ``preemptible`` attempts of a strictly lower priority than ``req`` are candidates.
    On each node victims are taken least valuable first until ``req`` fits, then any not
    needed after all are given back (most valuable first); the node whose victims are worth
    least (highest victim priority, then how many, then how long they have run) wins.
    """
    best: tuple[tuple, Victims] | None = None
    for node in nodes:
        if not node.could_ever_fit(req):
            continue
        cands = sorted(
            (
                r
                for r in node.attempts
                if r.preemptible and not r.stopping and r.priority < req.priority
            ),
            key=value,
        )
        if not cands:
            continue
        chosen: list[Running] = []
        for r in cands:
            chosen.append(r)
            if _fits_after(req, node, chosen):
                break
        else:
            continue
        for r in sorted(chosen, key=value, reverse=True):
            rest = [x for x in chosen if x is not r]
            if _fits_after(req, node, rest):
                chosen = rest
        cost = (
            max(r.priority for r in chosen),
            len(chosen),
            -sum(r.started for r in chosen),
            node.name,
        )
        if best is None or cost < best[0]:
            best = (cost, Victims(node.name, tuple(chosen)))
    return best[1] if best else None
