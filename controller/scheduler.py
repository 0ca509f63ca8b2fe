"""Placement: which node gets each ready task. Pure functions over read-only node views.

One pass (:func:`plan`) takes the ready tasks and the connected nodes and returns a
:class:`Plan`: bindings, preemptions, and reasons for tasks no node can ever hold. In order:

- **order** ready tasks by priority (aged: a task gains a point per ``aging`` seconds it has
  waited, so low priorities are never starved forever), then, under ``critical-path``, by
  the longest remaining path, then in the order they became ready;
- **filter** nodes: ``node_selector`` and required ``affinity``, then room for the task's
  CPU, memory, GPUs and a task slot;
- **score**: nodes with GPUs last for tasks without GPUs (unless nothing else fits), then
  the preferred affinity weights, then the policy's node order, then the name;
- **bind**: the task's resources are charged to its node before the next task is placed;
  a gang (``replicas`` > 1) gets that many distinct nodes, or none;
- **preempt**: a task that fits nowhere may stop ``preemptible`` attempts of lower priority
  (:mod:`tether.controller.preemption`); it is placed in a later pass once they are gone.

Nodes are indexed by label set and kept sorted by each policy's key, so a decision costs
about a sorted-list walk to the first node that fits, not a scan of every node. Nothing here
knows about etcd, gRPC or asyncio.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from tether.api.v1 import types_pb2
from tether.controller.policies import DEFAULT_POLICY, POLICIES, Policy, get_policy
from tether.controller.preemption import Victims, choose_victims
from tether.controller.views import MAX_PRIORITY, NodeView, Running, TaskRequest

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Binding",
    "NodeView",
    "Plan",
    "Policy",
    "Preemption",
    "Running",
    "TaskRequest",
    "effective_priority",
    "get_policy",
    "never_fits",
    "plan",
]

_EPS = 1e-9


@dataclass(frozen=True)
class Binding:
    """One placed task (or one replica of a gang): its key, the node chosen and the GPU
    indices it gets there."""

    key: Hashable
    node: str
    gpu_indices: tuple[int, ...] = ()
    replica: int = 0


@dataclass(frozen=True)
class Preemption:
    """Stop ``victims`` so that the task ``key`` fits on their node in a later pass."""

    key: Hashable
    victims: Victims


@dataclass
class Plan:
    """The outcome of one placement pass.

    Attributes:
        bindings: Placed tasks, in placement order (a gang's replicas together, index order).
        reasons: Why a task that was not placed cannot be, for tasks no node can ever hold
            (or when no node is connected). Tasks that only wait for capacity to free up, or
            that were not tried because every node is at its task limit, have no entry.
        preemptions: Attempts to stop for tasks of higher priority.
    """

    bindings: list[Binding] = field(default_factory=list)
    reasons: dict[Hashable, str] = field(default_factory=dict)
    preemptions: list[Preemption] = field(default_factory=list)


def effective_priority(r: TaskRequest, now: float, aging: float) -> int:
    """``r``'s priority plus a point per ``aging`` seconds it has waited, at most 100;
    ``aging`` 0 turns aging off."""
    if aging <= 0 or now <= r.ready_at:
        return r.priority
    # The epsilon: (100 * a) / a can come out a hair under 100, and a task that has waited
    # exactly N agings must have gained N points.
    return min(MAX_PRIORITY, r.priority + int((now - r.ready_at) / aging + 1e-9))


class _Index:
    """The pass's nodes, grouped by label set and GPU presence, kept sorted per policy."""

    def __init__(self, nodes: Iterable[NodeView], min_cpu: float, min_mem: int) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.group_of: dict[str, tuple] = {}
        self.groups: dict[tuple, dict[str, str]] = {}
        self.members: dict[tuple, list[str]] = {}
        for n in sorted(nodes, key=lambda n: n.name):
            self.nodes[n.name] = n
            g = (n.labels, bool(n.gpu_indices))
            self.group_of[n.name] = g
            if g not in self.groups:
                self.groups[g] = dict(n.labels)
                self.members[g] = []
            self.members[g].append(n.name)
        self.min_cpu, self.min_mem = min_cpu, min_mem
        # (policy name, level) -> sorted [(node key, node name)] of the level's nodes not yet
        # saturated; a level is a tuple of groups of equal rank for some task.
        self.sorted: dict[tuple[str, tuple], list[tuple[float, str]]] = {}
        # node name -> the sorted lists it is in, with their policy's name
        self.lists_of: dict[str, list[tuple[str, list[tuple[float, str]]]]] = {}
        self.keys: dict[str, dict[str, float]] = {}
        self.policy_objs: dict[str, Policy] = {}
        self.bad: dict[tuple[float, int, int], set[str]] = {}
        self.levels: dict[tuple, list[tuple]] = {}
        self.slots = sum(1 for n in self.nodes.values() if n.has_slot)
        self.preemptible = any(
            r.preemptible and not r.stopping for n in self.nodes.values() for r in n.attempts
        )

    def _saturated(self, n: NodeView) -> bool:
        # No task of this pass fits any more: leave the sorted lists for good.
        return not n.has_slot or n.cpu_free + _EPS < self.min_cpu or n.memory_free < self.min_mem

    def by_policy(self, p: Policy, level: tuple) -> list[tuple[float, str]]:
        """The level's unsaturated nodes in ``p``'s order (then by name)."""
        lst = self.sorted.get((p.name, level))
        if lst is None:
            keys = self.keys.setdefault(p.name, {})
            self.policy_objs[p.name] = p
            lst = []
            for g in level:
                for name in self.members[g]:
                    n = self.nodes[name]
                    if not self._saturated(n):
                        k = keys.get(name)
                        if k is None:
                            k = keys[name] = p.node_key(n)
                        lst.append((k, name))
                        self.lists_of.setdefault(name, []).append((p.name, lst))
            lst.sort()
            self.sorted[(p.name, level)] = lst
        return lst

    def levels_for(self, r: TaskRequest) -> list[tuple]:
        """Groups allowed for ``r`` in levels, best first: no GPUs for a GPU-less task, then
        by preferred affinity weight."""
        ck = (r.constraints, r.gpu > 0)
        lv = self.levels.get(ck)
        if lv is None:
            tiers: dict[tuple[int, int], list[tuple]] = {}
            c = r.constraints
            for g, labels in self.groups.items():
                if c.empty or c.allows(labels):
                    gpu_penalty = 1 if (g[1] and r.gpu == 0) else 0
                    tiers.setdefault((gpu_penalty, -c.preference(labels)), []).append(g)
            lv = self.levels[ck] = [tuple(tiers[k]) for k in sorted(tiers)]
        return lv

    def first_fit(self, r: TaskRequest, p: Policy, level: tuple) -> str | None:
        """The best node of ``level`` that fits ``r`` now, by ``p``'s order."""
        nodes = self.nodes
        cpu, mem, gpu = r.cpu - _EPS, r.memory, r.gpu
        # Within a pass nodes only fill up: a node that cannot hold a shape now never will.
        bad = self.bad.setdefault((cpu, mem, gpu), set())
        lst = self.by_policy(p, level)
        i = 0
        while i < len(lst):
            name = lst[i][1]
            if name in bad:
                i += 1
                continue
            n = nodes[name]
            if (
                n.cpu_used + cpu <= n.cpu_total
                and n.memory_used + mem <= n.memory_total
                and (not gpu or len(n.gpu_indices) - len(n.gpus_used) >= gpu)
                and (n.max_tasks <= 0 or n.running < n.max_tasks)
            ):
                return name
            if self._saturated(n):
                del lst[i]
                continue
            bad.add(name)
            i += 1
        return None

    def all_fits(self, r: TaskRequest, p: Policy, level: tuple) -> list[str]:
        return [name for _, name in self.by_policy(p, level) if self.nodes[name].fits(r)]

    def bind(self, name: str, r: TaskRequest, gpus: tuple[int, ...]) -> None:
        old = self.nodes[name]
        new = self.nodes[name] = old.with_bound(r, gpus)
        if old.has_slot and not new.has_slot:
            self.slots -= 1
        lists = self.lists_of.get(name)
        if not lists:
            return
        saturated = self._saturated(new)
        new_keys: dict[str, float] = {}
        for pname, lst in lists:
            keys = self.keys[pname]
            old_key = keys[name]
            i = bisect.bisect_left(lst, (old_key, name))
            if i < len(lst) and lst[i] == (old_key, name):
                del lst[i]
            if not saturated:
                k = new_keys.get(pname)
                if k is None:
                    k = new_keys[pname] = self.policy_objs[pname].node_key(new)
                bisect.insort(lst, (k, name))
        for pname, k in new_keys.items():
            self.keys[pname][name] = k
        if saturated:
            del self.lists_of[name]

    def mark_stopping(self, v: Victims) -> None:
        n = self.nodes[v.node]
        keys = {r.key for r in v.victims}
        self.nodes[v.node] = replace(
            n,
            attempts=tuple(replace(r, stopping=True) if r.key in keys else r for r in n.attempts),
        )
        self.preemptible = any(
            r.preemptible and not r.stopping for n in self.nodes.values() for r in n.attempts
        )

    def allowed_nodes(self, r: TaskRequest) -> list[NodeView]:
        return [
            self.nodes[name]
            for level in self.levels_for(r)
            for g in level
            for name in self.members[g]
        ]


def plan(
    ready: Sequence[TaskRequest],
    nodes: Iterable[NodeView],
    policy: Policy,
    *,
    now: float = 0.0,
    aging: float = 0.0,
    preempt: bool = True,
) -> Plan:
    """Place ``ready`` tasks on connected ``nodes``; ``policy`` for tasks that name none.

    Resources bound earlier in the pass count against later tasks. Once a task's shape
    (resources, constraints, gang size) found no node, later tasks of that shape are not
    tried again in this pass; once no node has a free task slot (and no attempt could be
    preempted), the pass ends.

    Args:
        ready: Ready tasks, in any order (the pass orders them).
        nodes: Views of the connected, schedulable nodes.
        policy: The controller's policy.
        now: The clock ``ready_at`` is on, for aging.
        aging: Seconds of waiting that add one priority point; 0: no aging.
        preempt: Whether preemption may be planned.
    """
    out = Plan()
    if not ready:
        return out
    min_cpu = min(r.cpu for r in ready)
    min_mem = min(r.memory for r in ready)
    idx = _Index(nodes, min_cpu, min_mem)
    if not idx.nodes:
        return out
    if idx.slots == 0 and not (preempt and idx.preemptible):
        return out

    def order(r: TaskRequest) -> tuple:
        p = r.policy or policy
        return (-effective_priority(r, now, aging), -r.rank if p.ranks else 0.0, r.seq)

    failed: dict[tuple, str] = {}
    no_victims: set[tuple] = set()
    for r in sorted(ready, key=order):
        p = r.policy or policy
        sig = (r.cpu, r.memory, r.gpu, r.constraints.selector, r.constraints.required, r.replicas)
        if sig in failed:
            if failed[sig]:
                out.reasons[r.key] = failed[sig]
            elif preempt and idx.preemptible and r.may_preempt:
                _try_preempt(r, idx, out, no_victims)
            continue
        if idx.slots == 0:
            if not (preempt and idx.preemptible):
                break
            _try_preempt(r, idx, out, no_victims)
            continue
        placed = _place_gang(r, p, idx, out) if r.replicas > 1 else _place_one(r, p, idx, out)
        if placed:
            continue
        why = failed[sig] = _never_fits(r, idx)
        if why:
            out.reasons[r.key] = why
        elif preempt and idx.preemptible and r.may_preempt:
            _try_preempt(r, idx, out, no_victims)
    return out


def _place_one(r: TaskRequest, p: Policy, idx: _Index, out: Plan) -> bool:
    for level in idx.levels_for(r):
        name = idx.first_fit(r, p, level)
        if name is not None:
            gpus = idx.nodes[name].free_gpus[: r.gpu] if r.gpu else ()
            out.bindings.append(Binding(r.key, name, gpus))
            idx.bind(name, r, gpus)
            return True
    return False


def _place_gang(r: TaskRequest, p: Policy, idx: _Index, out: Plan) -> bool:
    chosen: list[str] = []
    for level in idx.levels_for(r):
        for name in idx.all_fits(r, p, level):
            chosen.append(name)
            if len(chosen) == r.replicas:
                break
        if len(chosen) == r.replicas:
            break
    if len(chosen) < r.replicas:
        return False  # all or nothing: nothing was charged
    for i, name in enumerate(chosen):
        gpus = idx.nodes[name].free_gpus[: r.gpu]
        out.bindings.append(Binding(r.key, name, gpus, replica=i))
        idx.bind(name, r, gpus)
    return True


def _try_preempt(r: TaskRequest, idx: _Index, out: Plan, no_victims: set[tuple]) -> None:
    if r.replicas > 1 or r.priority <= 0:
        return  # gangs are not placed by preemption: stopping N nodes' work is too costly
    sig = (r.cpu, r.memory, r.gpu, r.constraints.selector, r.constraints.required, r.priority)
    if sig in no_victims:
        return
    v = choose_victims(r, idx.allowed_nodes(r))
    if v is None:
        no_victims.add(sig)
        return
    out.preemptions.append(Preemption(r.key, v))
    idx.mark_stopping(v)


def _fmt_req(r: TaskRequest) -> str:
    from tether.sdk.quantities import format_memory

    return f"cpu={r.cpu:g} memory={format_memory(r.memory)} gpu={r.gpu}"


def _never_fits(r: TaskRequest, idx: _Index) -> str:
    """Why no connected node can ever hold ``r`` (naming the blocking resource or
    constraint), or ``""`` when it only waits for capacity."""
    c = r.constraints
    allowed = idx.allowed_nodes(r)
    where = f" with {c.describe()}" if c.describe() else ""
    if not allowed:
        return f"no node matches {c.describe()} (of {len(idx.nodes)} connected)"
    able = [n for n in allowed if n.could_ever_fit(r)]
    if r.replicas > 1:
        if len(able) >= r.replicas:
            return ""
        return (
            f"gang of {r.replicas} replicas needs {r.replicas} nodes{where} that can each hold "
            f"{_fmt_req(r)}; only {len(able)} can"
        )
    if able:
        return ""
    best_gpu = max(len(n.gpu_indices) for n in allowed)
    if r.gpu > best_gpu:
        return f"needs {r.gpu} GPUs{where}; the best node has {best_gpu}"
    best_cpu = max(n.cpu_total for n in allowed)
    if r.cpu > best_cpu + _EPS:
        return f"needs cpu={r.cpu:g}{where}; the best node has {best_cpu:g}"
    best_mem = max(n.memory_total for n in allowed)
    if r.memory > best_mem:
        from tether.sdk.quantities import format_memory

        return (
            f"needs memory={format_memory(r.memory)}{where}; "
            f"the best node has {format_memory(best_mem)}"
        )
    return f"no node{where} can ever hold {_fmt_req(r)} at once"


def never_fits(request: types_pb2.Resources, nodes: Iterable[NodeView]) -> str:
    """Explain why no connected node could ever hold ``request``, or return ``""``."""
    views = list(nodes)
    if not views:
        return "no nodes are connected"
    return _never_fits(TaskRequest.of("", request), _Index(views, 0.0, 0))
