"""Node liveness without a lease per node: the records of a term's nodes share one etcd lease,
heartbeats write nothing to etcd, and a node whose agent falls silent is still lost a lease
TTL after its last heartbeat — as when each node's own lease expired."""

from __future__ import annotations

import asyncio
import time

import grpc
from etcd3aio import Etcd3Client
from helpers import Mesh

from tether.api.v1 import agent_pb2, agent_pb2_grpc, types_pb2

TTL = 2


class RawAgent:
    """An agent stream that registers and then beats every ``interval`` (None: never)."""

    def __init__(self, address: str, name: str, interval: float | None) -> None:
        self.address = address
        self.name = name
        self.interval = interval
        self.acks = 0
        self.ended_at = 0.0
        self.registered_at = 0.0

    async def run(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        outbox.put_nowait(
            agent_pb2.AgentMessage(
                register=agent_pb2.Register(
                    node=self.name,
                    node_id=f"raw-{self.name}",
                    capacity=types_pb2.Resources(cpu=1, memory_bytes=2**30),
                    agent_version="raw",
                    runtime="raw",
                )
            )
        )

        async def requests():
            while (msg := await outbox.get()) is not None:
                yield msg

        async def beat():
            seq = 0
            while self.interval is not None:
                await asyncio.sleep(self.interval)
                seq += 1
                outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq)))

        async with grpc.aio.insecure_channel(self.address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
            beating = None
            try:
                async for msg in call:
                    kind = msg.WhichOneof("msg")
                    if kind == "registered":
                        self.registered_at = time.monotonic()
                        beating = asyncio.create_task(beat())
                    elif kind == "heartbeat_ack":
                        self.acks += 1
            except grpc.aio.AioRpcError:
                pass
            finally:
                self.ended_at = time.monotonic()
                if beating:
                    beating.cancel()
                outbox.put_nowait(None)


async def _node_leases(endpoint: str, prefix: str) -> dict[str, int]:
    async with Etcd3Client([endpoint]) as c:
        resp = await c.kv.get(f"{prefix}/nodes/", range_end=f"{prefix}/nodes0")
        return {kv.key.decode().rsplit("/", 1)[1]: kv.lease for kv in resp.kvs}


def test_a_silent_node_is_lost_after_its_ttl_and_heartbeats_write_nothing(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=TTL)
    try:
        mesh.start_controller()
        store = mesh.controller.store
        beating = RawAgent(mesh.address, "beating", 0.2)
        silent = RawAgent(mesh.address, "silent", None)
        tasks = [asyncio.run_coroutine_threadsafe(a.run(), mesh.loop) for a in (beating, silent)]
        mesh.wait_for(lambda: beating.registered_at and silent.registered_at, 10, "registered")
        leases = mesh.call(_node_leases(etcd.endpoint, prefix))
        # One lease for both records: the term's.
        assert set(leases) == {"beating", "silent"} and len(set(leases.values())) == 1
        txns, puts = store.txn_count, store.put_count

        mesh.wait_for(lambda: silent.ended_at, TTL + 3, "the silent node's stream ended")
        # Not before its TTL: etcd would have kept a node lease that long.
        assert silent.ended_at - silent.registered_at >= TTL - 0.05
        assert silent.ended_at - silent.registered_at <= TTL + 1.5
        mesh.wait_for(
            lambda: "silent" not in mesh.call(_node_leases(etcd.endpoint, prefix)),
            3,
            "the silent node's record deleted",
        )
        acks = beating.acks
        time.sleep(TTL)
        assert beating.acks >= acks + 5 and not beating.ended_at
        assert set(mesh.call(_node_leases(etcd.endpoint, prefix))) == {"beating"}
        # Dozens of heartbeats; one write: the silent node's record deleted.
        assert beating.acks >= 15
        assert (store.txn_count - txns, store.put_count - puts) == (1, 0)
        (node,) = mesh.client().nodes()
        assert node.name == "beating"
    finally:
        mesh.close()
        for task in locals().get("tasks", []):
            task.cancel()


def test_agents_register_again_when_the_term_lease_is_gone(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=TTL)
    try:
        mesh.start_controller()
        agents = [mesh.add_agent(f"n{i}") for i in range(2)]
        (lease,) = set(mesh.call(_node_leases(etcd.endpoint, prefix)).values())

        async def revoke():
            async with Etcd3Client([etcd.endpoint]) as c:
                await c.lease.revoke(lease)

        # As if etcd had not heard from the controller for a TTL: every record is gone.
        mesh.call(revoke())
        mesh.wait_for(
            lambda: all(a.registrations >= 2 and a.connected.is_set() for a in agents),
            TTL * 3,
            "agents registered again",
        )
        leases = mesh.call(_node_leases(etcd.endpoint, prefix))
        assert set(leases) == {"n0", "n1"}
        assert len(set(leases.values())) == 1 and lease not in leases.values()
    finally:
        mesh.close()
