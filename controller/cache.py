"""The controller's memory: unfinished runs, known nodes, the ready queue, resource accounting.

etcd is the source of truth; this cache is what the engine's rooms read and change on the one
asyncio loop. Each node's entry holds both what placement needs (capacity, what is bound) and
its liveness (agent stream, lease, heartbeats); placement sees only a read-only
:class:`~tether.controller.scheduler.NodeView` of it, and metrics only a :class:`Snapshot`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tether.api.v1 import types_pb2
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.records import AgentSession, RunEntry, TaskEntry
from tether.controller.scheduler import NodeView, Running
from tether.sdk.constants import DEFAULT_PRIORITY

__all__ = ["Cache", "NodeSnapshot", "NodeState", "Snapshot"]

TaskKey = tuple[str, str]


@dataclass
class NodeState:
    """What the controller knows of one node: capacity, what is bound to it, and its stream."""

    name: str
    capacity: types_pb2.Resources = field(default_factory=types_pb2.Resources)
    gpu_indices: list[int] = field(default_factory=list)
    max_tasks: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    cpu_used: float = 0.0
    memory_used: int = 0
    gpus_used: set[int] = field(default_factory=set)
    attempts: set[TaskKey] = field(default_factory=set)
    # Of those, the attempts of preemptible tasks (what preemption may stop).
    preemptible: set[TaskKey] = field(default_factory=set)
    session: AgentSession | None = None
    # Where other nodes reach this one, and a port free on it (Register/Heartbeat).
    address: str = ""
    free_port: int = 0
    # The node id of the agent that last registered (kept in its work dir).
    node_id: str = ""
    lease_id: int = 0
    # The etcd revision that wrote the node's record at its registration (0: not this term).
    record_revision: int = 0
    # When the agent last beat (time.monotonic()); 0 before its first.
    last_heartbeat: float = 0.0
    # When the node last renewed its liveness (registration or heartbeat; time.monotonic()).
    last_contact: float = 0.0
    # How long its agent keeps working without contact (Register.disconnect_grace), seconds.
    disconnect_grace: float = 0.0
    # An operator's cordon or drain (types.NodeControl, kept in etcd).
    cordoned: bool = False
    draining: bool = False
    drain_deadline: float = 0.0  # seconds since the epoch
    drain_timer: asyncio.TimerHandle | None = None
    # The agent drains itself before it exits (Register/Heartbeat.draining); not kept in
    # etcd: the next agent on the node starts out ready.
    agent_draining: bool = False
    # Attempts RUNNING here that the agent's last heartbeat did not list.
    unlisted: set[tuple[str, str, int]] = field(default_factory=set)
    # Stale attempts the agent still runs (it came back after the node was lost; they are
    # being stopped), with the (cpu, memory, GPU indices) they hold until they end: nothing
    # new is placed on those meanwhile.
    stale: dict[tuple[str, str, int], tuple[float, int, frozenset[int]]] = field(
        default_factory=dict
    )
    # The last view() without victims, until changed().
    _view: NodeView | None = field(default=None, repr=False, compare=False)

    @property
    def schedulable(self) -> bool:
        return self.session is not None and not self.cordoned and not self.agent_draining

    def allocated(self) -> types_pb2.Resources:
        """What attempts bound here hold."""
        return types_pb2.Resources(
            cpu=self.cpu_used, memory_bytes=self.memory_used, gpu=len(self.gpus_used)
        )

    def changed(self) -> None:
        """Something :meth:`view` shows changed (resources charged or freed, the agent
        registered again): the next view is built afresh."""
        self._view = None

    def view(self, victims: tuple[Running, ...] = ()) -> NodeView:
        """The read-only placement view of this node (``victims``: its preemptible
        attempts). Kept until :meth:`changed`: every scheduling pass and every submit
        bound at once views every connected node, most of them unchanged since the last."""
        if not victims and self._view is not None:
            return self._view
        cpu, memory, gpus = self.cpu_used, self.memory_used, frozenset(self.gpus_used)
        for stale_cpu, stale_memory, stale_gpus in self.stale.values():
            cpu, memory, gpus = cpu + stale_cpu, memory + stale_memory, gpus | stale_gpus
        view = NodeView(
            name=self.name,
            cpu_total=self.capacity.cpu,
            cpu_used=cpu,
            memory_total=self.capacity.memory_bytes,
            memory_used=memory,
            gpu_indices=tuple(self.gpu_indices),
            gpus_used=gpus,
            max_tasks=self.max_tasks,
            running=len(self.attempts) + len(self.stale),
            labels=tuple(sorted(self.labels.items())),
            attempts=victims,
        )
        if not victims:
            self._view = view
        return view


@dataclass(frozen=True)
class NodeSnapshot:
    """One node's gauges at one moment."""

    name: str
    connected: bool
    cpu_capacity: float
    cpu_allocated: float
    memory_capacity: int
    memory_allocated: int
    gpus: int
    gpus_allocated: int
    running_attempts: int
    # Seconds since the last heartbeat; None before the first.
    heartbeat_age: float | None


@dataclass(frozen=True)
class Snapshot:
    """What the controller holds at one moment, for metrics; never changes once taken."""

    leader: bool
    tasks_by_state: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    active_runs: int = 0
    ready_queue: int = 0
    nodes: tuple[NodeSnapshot, ...] = ()


class Cache:
    """Unfinished runs, nodes and the ready queue, with each node's resource accounting."""

    def __init__(self) -> None:
        self.runs: dict[str, RunEntry] = {}
        self.nodes: dict[str, NodeState] = {}
        # READY tasks in the order they became ready, each with its place in that order.
        self.ready: dict[TaskKey, int] = {}
        # The ready tasks above the default priority (a subset of ``ready``): placement
        # plans them first however long the queue.
        # The ready tasks by declared priority, each level oldest first (a key that left the
        # queue is dropped when next met): a scheduling pass adds to its first window the
        # tasks that rank above the oldest ones, however far back in the queue they are.
        self.levels: dict[int, dict[TaskKey, int]] = {}
        self._ready_seq = 0
        self.ready_since: dict[TaskKey, float] = {}
        # Runs being rebuilt from etcd after a conflicting write: reports about them wait.
        self.reloading: set[str] = set()
        # Set whenever a scheduling pass might place something it could not before.
        self.wakeup = asyncio.Event()

    def kick(self) -> None:
        """Ask for a scheduling pass."""
        self.wakeup.set()

    def task(self, run_id: str, name: str) -> tuple[RunEntry | None, TaskEntry | None]:
        """The cached run and its task (either None when not cached)."""
        run = self.runs.get(run_id)
        return run, (run.tasks.get(name) if run else None)

    def node(self, name: str) -> NodeState:
        """The node's entry, created empty if it is new."""
        st = self.nodes.get(name)
        if st is None:
            st = self.nodes[name] = NodeState(name)
        return st

    def enqueue(self, key: TaskKey) -> None:
        """Put a READY task at the end of the ready queue."""
        if key not in self.ready:
            self._ready_seq += 1
            self.ready[key] = self._ready_seq
            _, e = self.task(*key)
            if e is not None:
                level = self.levels.setdefault(declared_priority(e.msg.spec), {})
                level.pop(key, None)  # back in the queue: at the end of its level too
                level[key] = self._ready_seq
        self.ready_since.setdefault(key, time.monotonic())

    def hold_stale(self, node: NodeState, ref: tuple[str, str, int], e: TaskEntry | None) -> None:
        """Count what a stale attempt still running on ``node`` holds (``e``: its task),
        until :meth:`release_stale`."""
        if e is None:
            return  # its run is no longer cached: what it holds is not known
        r = e.msg.spec.resources
        att = next((a for a in e.msg.attempts if a.number == ref[2]), None)
        rep = gangs.replica_on(e.msg, node.name) if e.msg.replicas else None
        gpus = rep.gpu_indices if rep is not None else att.gpu_indices if att else ()
        node.stale[ref] = (r.cpu, r.memory_bytes, frozenset(gpus))
        node.changed()

    def release_stale(self, name: str, ref: tuple[str, str, int] | None = None) -> None:
        """A stale attempt on node ``name`` ended (None: all of them): its hold ends."""
        node = self.nodes.get(name)
        if node is None or not node.stale:
            return
        if ref is None:
            node.stale.clear()
        elif node.stale.pop(ref, None) is None:
            return
        node.changed()
        self.kick()

    def unready(self, key: TaskKey, e: TaskEntry | None) -> None:
        """Take a task out of the ready queue (``e``: its entry, to find its level)."""
        if self.ready.pop(key, None) is not None and e is not None:
            prio = declared_priority(e.msg.spec)
            level = self.levels.get(prio)
            if level is not None:
                level.pop(key, None)
                if not level:  # one level left is the common case: a pass then looks no further
                    del self.levels[prio]

    def account(self, e: TaskEntry, sign: int) -> None:
        """Add (+1) or remove (-1) an attempt's resources on its node (each replica's node,
        for a gang)."""
        key = (e.msg.run_id, e.msg.spec.name)
        r = e.msg.spec.resources
        preemptible = e.msg.spec.preemptible and not gangs.is_gang(e.msg)
        freed = False
        for name, gpus in gangs.placements(e.msg):
            node = self.node(name)
            node.changed()
            if sign > 0:
                if key in node.attempts:
                    continue
                node.attempts.add(key)
                if preemptible:
                    node.preemptible.add(key)
                node.cpu_used += r.cpu
                node.memory_used += r.memory_bytes
                node.gpus_used.update(gpus)
            else:
                if key not in node.attempts:
                    continue
                node.attempts.discard(key)
                node.preemptible.discard(key)
                node.cpu_used = max(0.0, node.cpu_used - r.cpu)
                node.memory_used = max(0, node.memory_used - r.memory_bytes)
                node.gpus_used.difference_update(gpus)
                freed = True
        if freed:
            self.kick()

    def add_run(self, run: RunEntry) -> None:
        """Cache a run, charging its active attempts to their nodes."""
        for e in run.tasks.values():
            if e.msg.state in lc.TASK_ACTIVE:
                self.account(e, +1)
        self.runs[run.msg.id] = run

    def drop_run(self, run_id: str) -> None:
        """Forget a run: its attempts release their nodes, its tasks leave the queue."""
        old = self.take_run(run_id)
        if old:
            self.release(old)

    def take_run(self, run_id: str) -> RunEntry | None:
        """Forget a run but keep what its attempts hold on their nodes (they still run):
        for a reload, which :meth:`release`s the old copy as it adds the new one."""
        old = self.runs.pop(run_id, None)
        if old:
            for e in old.tasks.values():
                self.unready((run_id, e.msg.spec.name), e)
        return old

    def release(self, run: RunEntry) -> None:
        """Release what the attempts of a run no longer cached hold on their nodes."""
        for e in run.tasks.values():
            self.account(e, -1)

    def evict(self, run: RunEntry) -> None:
        """Drop a finished run once its final state is in etcd (reads then go to etcd)."""
        if self.runs.get(run.msg.id) is run and run.msg.state in lc.RUN_TERMINAL:
            del self.runs[run.msg.id]

    def connected_views(self) -> list[NodeView]:
        """Placement views of the nodes whose agents are connected."""
        return [n.view(self._victims(n)) for n in self.nodes.values() if n.schedulable]

    def _victims(self, n: NodeState) -> tuple[Running, ...]:
        out = []
        for key in n.preemptible:
            _, e = self.task(*key)
            if e is None or e.msg.state not in lc.TASK_ACTIVE:
                continue
            m = e.msg
            r = m.spec.resources
            started = m.attempts[-1].scheduled_at.seconds if m.attempts else 0
            out.append(
                Running(
                    key,
                    cpu=r.cpu,
                    memory=r.memory_bytes,
                    gpus=tuple(m.attempts[-1].gpu_indices) if m.attempts else (),
                    priority=declared_priority(m.spec),
                    preemptible=True,
                    started=float(started),
                    stopping=bool(m.preempted_by) or m.cancel_requested,
                )
            )
        return tuple(out)

    def snapshot(self) -> Snapshot:
        """The gauges of this moment, as an immutable value metrics can keep."""
        by_state: dict[str, int] = {}
        for run in self.runs.values():
            for e in run.tasks.values():
                name = lc.task_state_name(e.msg.state)
                by_state[name] = by_state.get(name, 0) + 1
        now = time.monotonic()
        nodes = tuple(
            NodeSnapshot(
                name=n.name,
                connected=n.session is not None,
                cpu_capacity=n.capacity.cpu,
                cpu_allocated=n.cpu_used,
                memory_capacity=n.capacity.memory_bytes,
                memory_allocated=n.memory_used,
                gpus=len(n.gpu_indices),
                gpus_allocated=len(n.gpus_used),
                running_attempts=len(n.attempts),
                heartbeat_age=(now - n.last_heartbeat) if n.last_heartbeat else None,
            )
            for n in self.nodes.values()
            # A node gone (no agent, no record, nothing bound to it) leaves the metrics: with
            # autoscaled nodes, their series would otherwise grow for the leader's whole term.
            if n.session is not None or n.lease_id or n.attempts
        )
        return Snapshot(
            leader=True,
            tasks_by_state=MappingProxyType(by_state),
            active_runs=len(self.runs),
            ready_queue=len(self.ready),
            nodes=nodes,
        )


def declared_priority(spec: types_pb2.TaskSpec) -> int:
    """A task's priority as its spec declares it (the default when it declares none)."""
    return spec.priority if spec.HasField("priority") else DEFAULT_PRIORITY
