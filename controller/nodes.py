"""Nodes: registration, heartbeats and leases, the agent streams, and the watch that notices
a node whose lease expired (its attempts are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from google.protobuf import duration_pb2

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.attempts import Attempts
from tether.controller.cache import Cache, NodeState
from tether.controller.config import ControllerConfig
from tether.controller.dispatch import Dispatch
from tether.controller.errors import (
    AlreadyExists,
    NotFound,
    NotLeader,
    OutOfRange,
    StoreUnavailable,
)
from tether.controller.records import AgentSession, now
from tether.controller.store import Delete, Put, Store, mod_revision_is
from tether.controller.term_lease import TermLease
from tether.controller.timers import Timers
from tether.sdk.telemetry import get_logger

__all__ = ["Nodes", "grace_deadline"]

log = get_logger("controller.engine")
# Lease renewals in flight at once when a new leader takes over.
_REFRESH_CONCURRENCY = 64
# Registrations writing to etcd at once. Thousands of agents register together after a
# failover; unbounded, their transactions queue on the etcd channel ahead of the leader's own
# lease renewal, and the new leader loses its lease to the very agents it serves.
_REGISTER_CONCURRENCY = 64
# How long past the cancel grace a stale attempt's resources stay held if its end is never
# reported (an agent gone again), seconds.
STALE_HOLD_MARGIN = 30.0


def _schedule_state(st: NodeState) -> str:
    if st.draining or st.agent_draining:
        return "draining" if st.attempts else "drained"
    return "cordoned" if st.cordoned else "ready"


def grace_deadline(st: NodeState) -> float:
    """When (time.monotonic()) a node out of contact has stopped its attempts by itself: its
    last contact plus its agent's disconnect grace. Before then, none of them may start
    elsewhere."""
    return st.last_contact + st.disconnect_grace if st.last_contact else 0.0


def _check_claim(st: NodeState, session: AgentSession, reg: agent_pb2.Register) -> None:
    """Refuse a second agent for a node whose agent is connected (another node id)."""
    old = st.session
    if old is None or old.closed or old is session or reg.node_id == st.node_id:
        return
    # Two agents claiming one node would take it from each other at every reconnect.
    raise AlreadyExists(
        f"node {reg.node} is connected from another agent (node id {st.node_id[:8] or '-'}, "
        f"this agent's is {reg.node_id[:8] or '-'}); stop that agent, or give this one "
        "another --name"
    )


class Nodes:
    """Keeps the cache's nodes in step with agents and their etcd leases."""

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        cache: Cache,
        attempts: Attempts,
        dispatch: Dispatch,
        timers: Timers | None = None,
    ) -> None:
        self.config = config
        self.timers = timers
        # Nodes known at takeover whose agents have not registered with this term yet.
        self.awaited: set[str] = set()
        # Set when the engine stops: a registration that was waiting on etcd (a lease grant
        # through a quorum loss, say) must not bind its agent to a stopped engine, where its
        # heartbeats would be answered and its reports go nowhere.
        self.closed = False
        self.store = store
        self.keys = store.keys
        self.cache = cache
        self.attempts = attempts
        self.dispatch = dispatch
        # The lease of the records of nodes registered with this term; liveness is in memory.
        self.lease = TermLease(store, config.lease_ttl)
        self._registering = asyncio.Semaphore(_REGISTER_CONCURRENCY)
        # Nodes whose record the sweep is deleting (their agents stopped beating).
        self._expiring: set[str] = set()
        # Disconnect graces longer than a lease TTL, by node, as kept in etcd: after a
        # failover, a node's attempts wait that long before they may start elsewhere.
        self.graces: dict[str, float] = {}
        self._expiries: set[asyncio.Task] = set()

    async def load(self, revision: int) -> set[str]:
        """Read the registered nodes' leases and the operators' cordons and drains at
        ``revision``; return the registered nodes' names."""
        graces, _ = await self.store.range(self.keys.node_graces, revision=revision)
        for kv in graces:
            d = duration_pb2.Duration.FromString(kv.value)
            self.graces[kv.key.rsplit("/", 1)[1]] = d.ToNanoseconds() / 1e9
        nodes, _ = await self.store.range(self.keys.nodes, revision=revision)
        taken_over = time.monotonic()
        for kv in nodes:
            node = t.Node.FromString(kv.value)
            st = self.cache.node(node.name)
            st.lease_id = kv.lease
            # Failover grace: the controller was away, not the node. Each node counts as just
            # heard from, so none is declared lost (nor its attempts retried) sooner than a
            # full grace after this takeover.
            st.last_contact = taken_over
            st.disconnect_grace = max(st.disconnect_grace, self.grace_of(node.name))
            self.awaited.add(node.name)
        await self._refresh_leases(sorted({kv.lease for kv in nodes if kv.lease}))
        controls, _ = await self.store.range(self.keys.node_controls, revision=revision)
        for kv in controls:
            self._apply_control(kv.key.rsplit("/", 1)[1], t.NodeControl.FromString(kv.value))
        return {kv.key.rsplit("/", 1)[1] for kv in nodes}

    def _grace_op(self, node: str, grace: float) -> Put | Delete | None:
        """The write that keeps a node's disconnect grace for a later leader, if it changed:
        only one longer than a lease TTL is kept (a leader waits that long anyway)."""
        if grace > self.config.lease_ttl:
            if self.graces.get(node) == grace:
                return None
            value = duration_pb2.Duration()
            value.FromNanoseconds(int(grace * 1e9))
            return Put(self.keys.node_grace(node), value.SerializeToString())
        return Delete(self.keys.node_grace(node)) if node in self.graces else None

    def grace_of(self, node: str) -> float:
        """How long the agent of ``node`` may keep running its attempts out of contact, as
        far as this term knows (a lease TTL unless it registered a longer grace)."""
        return max(float(self.config.lease_ttl), self.graces.get(node, 0.0))

    async def _refresh_leases(self, leases: list[int]) -> None:
        """Renew each lease of the nodes' records once at takeover, so that it lives a full
        TTL from now: nobody renewed it while no controller led, and the agents need a moment
        to find this one."""
        gate = asyncio.Semaphore(_REFRESH_CONCURRENCY)

        async def refresh(lease: int) -> None:
            async with gate:
                with contextlib.suppress(Exception):  # expired: the node watch handles it
                    await self.store.keepalive(lease)

        await asyncio.gather(*(refresh(lease) for lease in leases))

    def session_of(self, node: str) -> AgentSession | None:
        """The open stream of a node's agent, or None when the node is not connected here."""
        st = self.cache.nodes.get(node)
        if st is None or st.session is None or st.session.closed:
            return None
        return st.session

    async def set_control(
        self, name: str, cordoned: bool, draining: bool = False, deadline: float = 0.0
    ) -> None:
        """Cordon, drain (``deadline``: seconds from now) or uncordon a known node."""
        if name not in self.cache.nodes and await self.store.get(self.keys.node(name)) is None:
            raise NotFound(f"node {name[:64]!r} is not registered")
        control = t.NodeControl(cordoned=cordoned, draining=draining)
        if draining:
            control.drain_deadline.FromNanoseconds(int((time.time() + deadline) * 1e9))
        key = self.keys.node_control(name)
        if cordoned:
            self._check_open()  # a term that has ended writes no more (see Submitter)
            await self.store.txn([], [Put(key, control.SerializeToString())])
        else:
            self._check_open()
            await self.store.txn([], [Delete(key)])
        self._apply_control(name, control)
        log.info("node control", node=name, cordoned=cordoned, draining=draining)

    def _apply_control(self, name: str, control: t.NodeControl) -> None:
        st = self.cache.node(name)
        st.cordoned, st.draining = control.cordoned, control.draining
        st.drain_deadline = control.drain_deadline.ToNanoseconds() / 1e9 if control.draining else 0
        if st.drain_timer is not None:
            st.drain_timer.cancel()
            st.drain_timer = None
        if st.draining:
            delay = max(0.0, st.drain_deadline - time.time())
            st.drain_timer = asyncio.get_running_loop().call_later(delay, self._drain_due, name)
        self.cache.kick()

    def _drain_due(self, name: str) -> None:
        """The drain's deadline: stop what still runs on the node, to be retried elsewhere."""
        st = self.cache.nodes.get(name)
        if st is None or not st.draining:
            return
        st.drain_timer = None
        session = self.session_of(name)
        for run_id, task in list(st.attempts):
            _, e = self.cache.task(run_id, task)
            if e is None or not gangs.is_on(e.msg, name) or e.msg.state not in lc.TASK_ACTIVE:
                continue
            rep = gangs.replica_on(e.msg, name)
            if rep is not None and rep.state in lc.TASK_TERMINAL:
                continue  # this replica is done
            if session is not None:
                self.dispatch.cancel(
                    session, run_id, task, e.msg.attempt, f"node {name} drained", requeue=True
                )

    async def list_nodes(self) -> list[t.Node]:
        """Registered nodes, with what is allocated on each."""
        kvs, _ = await self.store.range(self.keys.nodes)
        out = []
        for kv in kvs:
            node = t.Node.FromString(kv.value)
            st = self.cache.nodes.get(node.name)
            if st:
                node.allocated.CopyFrom(st.allocated())
                node.running_tasks = len(st.attempts)
                node.schedule_state = _schedule_state(st)
                if st.draining:
                    node.drain_deadline.FromNanoseconds(int(st.drain_deadline * 1e9))
            else:
                node.schedule_state = "ready"
            node.lease_id = kv.lease
            out.append(node)
        return out

    async def register(
        self, session: AgentSession, reg: agent_pb2.Register
    ) -> agent_pb2.Registered:
        """Record a node, bind it to a lease, apply its pending reports, reconcile its attempts."""
        async with self._registering:
            return await self._register(session, reg)

    async def _register(
        self, session: AgentSession, reg: agent_pb2.Register
    ) -> agent_pb2.Registered:
        self._check_open()
        st = self.cache.node(reg.node)
        _check_claim(st, session, reg)
        lease = await self.lease.get()
        self._check_open()
        _check_claim(st, session, reg)  # again: another agent may have registered meanwhile
        # Claim the node before the write, so no other agent's record can overwrite ours.
        old, old_id = st.session, st.node_id
        st.session, st.node_id = session, reg.node_id
        node = t.Node(
            name=reg.node,
            capacity=reg.capacity,
            gpus=reg.gpus,
            labels=reg.labels,
            agent_version=reg.agent_version,
            runtime=reg.runtime,
            registered_at=now(),
            lease_id=lease,
            max_tasks=reg.max_tasks,
            address=reg.address,
        )
        ops: list[Put | Delete] = [Put(self.keys.node(reg.node), node.SerializeToString(), lease)]
        grace = reg.disconnect_grace.ToNanoseconds() / 1e9
        grace_op = self._grace_op(reg.node, grace)
        if grace_op is not None:
            ops.append(grace_op)
        try:
            _, revision = await self.store.txn([], ops)
            self._check_open()
        except BaseException as e:
            if st.session is session:
                st.session, st.node_id = old, old_id
            if isinstance(e, Exception) and not isinstance(e, NotLeader):
                await self.lease.check(lease)
            raise
        if old is not None and old is not session:
            old.close()  # the same agent coming back: its old stream is dead
        self.awaited.discard(reg.node)
        self._expiring.discard(reg.node)
        st.capacity.CopyFrom(reg.capacity)
        st.gpu_indices = sorted(g.index for g in reg.gpus)
        st.labels = dict(reg.labels)
        st.max_tasks = reg.max_tasks
        st.changed()
        st.address = reg.address
        st.free_port = reg.free_port
        st.agent_draining = reg.draining
        st.lease_id = lease
        st.record_revision = revision
        st.last_heartbeat = st.last_contact = time.monotonic()
        st.disconnect_grace = grace if grace > 0 else float(self.config.lease_ttl)
        if grace > self.config.lease_ttl:
            self.graces[reg.node] = grace
        else:
            self.graces.pop(reg.node, None)
        for report in reg.pending_reports:
            self.attempts.on_status(session, report)
        self._reconcile_agent(st, session, {(r.run_id, r.task, r.attempt) for r in reg.running})
        if st.draining and st.drain_timer is None and 0 < st.drain_deadline <= time.time():
            # The drain's deadline passed while no agent listened (a failover, a reconnect):
            # what still runs is stopped now, as it would have been then.
            self._drain_due(reg.node)
        self.cache.kick()
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(self.config.heartbeat_interval * 1e9))
        ttl = duration_pb2.Duration(seconds=self.config.lease_ttl)
        log.info("node registered", node=reg.node, cpu=reg.capacity.cpu, gpus=len(reg.gpus))
        return agent_pb2.Registered(heartbeat_interval=interval, lease_ttl=ttl)

    def _reconcile_agent(
        self, st: NodeState, session: AgentSession, running: set[tuple[str, str, int]]
    ) -> None:
        """Compare what a registering agent runs with what is bound to its node."""
        for run_id, name in list(st.attempts):
            run, e = self.cache.task(run_id, name)
            if run is None or e is None or not gangs.is_on(e.msg, st.name):
                continue
            rep = gangs.replica_on(e.msg, st.name)
            if rep is not None and rep.state in lc.TASK_TERMINAL:
                continue  # this replica is done; the others still run
            if (run_id, name, e.msg.attempt) in running:
                if e.msg.state == lc.SCHEDULED:
                    self.attempts.mark_running(e, None)
                if e.msg.cancel_requested:  # asked while the agent was away
                    self.dispatch.cancel(session, run_id, name, e.msg.attempt, "cancelled")
                elif e.msg.preempted_by:  # preempted while the agent was away
                    self.dispatch.cancel(
                        session,
                        run_id,
                        name,
                        e.msg.attempt,
                        f"preempted by {e.msg.preempted_by}",
                        requeue=True,
                    )
            elif (rep.state if rep is not None else e.msg.state) == lc.SCHEDULED:
                self.dispatch.assign(run, e, only=st.name)  # the agent never got it
            else:
                self.attempts.lose(run, e, f"node {st.name} restarted without the attempt")
        self.cache.release_stale(st.name)  # the agent lists again what it still runs
        for run_id, name, attempt in running:
            _, e = self.cache.task(run_id, name)
            if (
                e is None
                or e.msg.attempt != attempt
                or not gangs.is_on(e.msg, st.name)
                or e.msg.state not in lc.TASK_ACTIVE
            ):
                self.dispatch.cancel(session, run_id, name, attempt, "stale attempt")
                # Until its final report (or a bound on the wait), what it holds stays held.
                ref = (run_id, name, attempt)
                self.cache.hold_stale(st, ref, e)
                if self.timers is not None:
                    wait = self.config.cancel_grace + STALE_HOLD_MARGIN
                    self.timers.later(wait, self.cache.release_stale, st.name, ref)

    def heartbeat(self, session: AgentSession, hb: agent_pb2.Heartbeat) -> bool:
        """Renew the node's liveness; False when its lease time ran out (the agent must
        re-register), as etcd answers the renewal of an expired lease.

        No etcd request: the node's record is on the term's lease (:class:`TermLease`), and
        :meth:`sweep` deletes it once the node has not beaten for a lease TTL. Also compares
        what the agent runs with what it should: an attempt RUNNING here that the agent has
        not listed in two heartbeats in a row (its final report would have come in between)
        was lost on the node, and is retried.

        Raises:
            StoreUnavailable: etcd has not confirmed the term's lease lately; the ack would
                vouch for a contact that the store may not have seen.
        """
        self._check_open()
        st = self.cache.nodes.get(session.node)
        if st is None or st.session is not session:
            return False
        beat = time.monotonic()
        if st.lease_id != self.lease.id or beat - st.last_contact > self.config.lease_ttl:
            return False
        if not self.lease.confirmed(beat):
            raise StoreUnavailable("etcd has not confirmed the node lease lately")
        if st.attempts or st.unlisted:
            self._check_running(st, hb)
        if st.stale:  # a stale attempt the agent no longer lists has ended
            listed = {(r.run_id, r.task, r.attempt) for r in hb.running}
            for ref in [ref for ref in st.stale if ref not in listed]:
                self.cache.release_stale(st.name, ref)
        if hb.free_port and hb.free_port <= 65535:
            st.free_port = hb.free_port
        if hb.draining != st.agent_draining:
            st.agent_draining = hb.draining
            log.info("node draining itself", node=st.name, draining=hb.draining)
        st.last_heartbeat = st.last_contact = beat
        return True

    def _check_running(self, st: NodeState, hb: agent_pb2.Heartbeat) -> None:
        listed = {(r.run_id, r.task, r.attempt) for r in hb.running}
        missing = set()
        for run_id, name in list(st.attempts):
            run, e = self.cache.task(run_id, name)
            if run is None or e is None or not gangs.running_on(e.msg, st.name):
                continue
            key = (run_id, name, e.msg.attempt)
            if key not in listed:
                if key in st.unlisted:
                    self.attempts.lose(run, e, f"node {st.name} no longer runs the attempt")
                else:
                    missing.add(key)
        st.unlisted = missing

    async def sweep(self) -> None:
        """Delete the record of each node of this term whose agent has not beaten for a
        lease TTL (what etcd did to a node's own lease); the node watch then loses it."""
        ttl = self.config.lease_ttl
        # etcd checks its leases' expiry every 500 ms; so often, or more at short TTLs.
        period = min(0.5, ttl / 10)
        while True:
            await asyncio.sleep(period)
            lease = self.lease.id
            if not lease:
                continue
            due = time.monotonic() - ttl
            for st in self.cache.nodes.values():
                if st.lease_id == lease and st.last_contact < due and st.name not in self._expiring:
                    self._expiring.add(st.name)
                    task = asyncio.create_task(self._expire(st.name, st.record_revision))
                    self._expiries.add(task)
                    task.add_done_callback(self._expiries.discard)

    async def _expire(self, name: str, revision: int) -> None:
        """Delete a silent node's record unless it changed since (its agent registered again)."""
        key = self.keys.node(name)
        deleted = False
        try:
            deleted, _ = await self.store.txn([mod_revision_is(key, revision)], [Delete(key)])
        except Exception as e:  # etcd away or leadership lost: the next sweep tries again
            log.warning("could not expire node record", node=name, error=str(e) or repr(e))
        finally:
            if not deleted:  # else the node watch hears of the delete, and forgets it
                self._expiring.discard(name)

    def disconnected(self, session: AgentSession) -> None:
        """The agent's stream ended. Its node stays until the lease expires."""
        st = self.cache.nodes.get(session.node)
        if st is not None and st.session is session:
            st.session = None
        session.close()

    def _check_open(self) -> None:
        if self.closed:
            raise NotLeader("this controller's leadership term has ended; reconnect")

    def close_sessions(self) -> None:
        """End every agent stream (the engine is stopping; agents reconnect to the leader)."""
        self.closed = True
        for task in list(self._expiries):
            task.cancel()
        for node in self.cache.nodes.values():
            if node.session:
                node.session.close()

    def _node_deleted(self, name: str, lease: int, revision: int = 0) -> None:
        self._expiring.discard(name)
        st = self.cache.nodes.get(name)
        if st is None:
            return
        if lease and st.lease_id and lease != st.lease_id:
            # The record of an old lease expired after the agent had already registered
            # again under a new one: the node is alive.
            return
        if revision and revision < st.record_revision:
            # A record deleted before the agent registered again (on the same term's lease):
            # the node is alive.
            return
        if st.session is not None:
            st.session.close()
            st.session = None
        st.lease_id = 0
        # The agent may still run these attempts until its grace is over (it then stops them
        # itself): their next copies wait for that, so two never overlap.
        hold = max(0.0, grace_deadline(st) - time.monotonic())
        if name in self.awaited and hold > 0 and self.timers is not None:
            # Its lease ran out while no controller led: the agent may be on its way back to
            # this new leader, and then its attempts simply go on.
            log.info("node record expired during failover; awaiting its agent", node=name)
            self.timers.later(hold, self._failover_grace_over, name)
            return
        self._lose_node(st, hold)

    def _failover_grace_over(self, name: str) -> None:
        """A node known at takeover whose record expired: lost unless its agent came back."""
        st = self.cache.nodes.get(name)
        if st is None or st.session is not None or name not in self.awaited:
            return
        self.awaited.discard(name)
        self._lose_node(st, 0.0)

    def _lose_node(self, st: NodeState, hold: float) -> None:
        name = st.name
        self.cache.release_stale(name)
        for run_id, task in list(st.attempts):
            run, e = self.cache.task(run_id, task)
            if run and e is not None and e.msg.state in lc.TASK_ACTIVE and gangs.is_on(e.msg, name):
                rep = gangs.replica_on(e.msg, name)
                if rep is not None and rep.state in lc.TASK_TERMINAL:
                    continue  # this replica is done; the others still run
                self.attempts.lose(run, e, f"node {name} lost (lease expired)", delay=hold)
        log.warning("node lost", node=name, retry_after=round(hold, 3))

    async def watch(self, revision: int) -> None:
        """Follow node records from ``revision``: a deleted one is a node whose lease expired."""
        while True:
            try:
                async for ev in self.store.watch(self.keys.nodes, revision):
                    revision = ev.revision + 1
                    if ev.deleted:
                        self._node_deleted(ev.key.rsplit("/", 1)[1], ev.prev_lease, ev.revision)
            except asyncio.CancelledError:
                raise
            except OutOfRange:
                # etcd compacted past where we were: what is gone now was deleted meanwhile.
                kvs, listed = await self.store.range(self.keys.nodes)
                alive = {kv.key.rsplit("/", 1)[1] for kv in kvs}
                for name, st in list(self.cache.nodes.items()):
                    if name not in alive and st.lease_id:
                        self._node_deleted(name, 0)
                revision = listed + 1
                log.warning("node watch resumed after compaction", revision=revision)
            except Exception as e:  # keep watching through etcd hiccups
                log.warning("node watch broke; resuming", error=str(e))
                await asyncio.sleep(0.5)
