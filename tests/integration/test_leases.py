"""A node's etcd lease follows the controller's current --lease-ttl."""

from __future__ import annotations

import asyncio

from etcd3aio import Etcd3Client
from helpers import Mesh

from tether.controller.etcd_process import free_port


def granted_ttl(endpoint: str, lease_id: int) -> int:
    async def ask():
        async with Etcd3Client([endpoint]) as c:
            return (await c.lease.time_to_live(lease_id)).grantedTTL

    return asyncio.run(ask())


def test_restart_with_a_new_lease_ttl_moves_nodes_to_it(etcd, prefix, tmp_path):
    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=10)
    try:
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        agent = mesh.add_agent("n1")
        (node,) = mesh.client().nodes()
        assert granted_ttl(etcd.endpoint, node.lease_id) == 10
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}", lease_ttl=3, heartbeat_interval=0)
        mesh.wait_for(lambda: agent.registrations >= 2, 10, "agent registered again")
        (node,) = Mesh.client(mesh).nodes()
        assert granted_ttl(etcd.endpoint, node.lease_id) == 3
        assert agent.connected.is_set()
    finally:
        mesh.close()
