"""High availability: a standby controller takes over; a deposed leader cannot write."""

from __future__ import annotations

import asyncio
import time

import pytest
from etcd3aio import Etcd3Client
from grpc_health.v1 import health_pb2
from helpers import ControllerProcess, Mesh, chain_workflow, health, success_events

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import NotLeader
from tether.controller.server import ControllerServer
from tether.sdk import Client, Workflow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.timeout(180)
def test_standby_takes_over_when_the_leader_is_killed(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log")
    b = ControllerProcess(etcd.endpoint, prefix, tmp_path / "b.log")
    a.start()
    b.start(leader=False)
    assert health(a.address, "tether.v1.ControllerService") == SERVING
    assert health(b.address, "tether.v1.ControllerService") == NOT_SERVING
    both = f"{a.address},{b.address}"
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        mesh.add_agent("n1", controller=both, cpu=1)
        mesh.add_agent("n2", controller=both, cpu=1)
        client = Client(f"{b.address},{a.address}", timeout=10)  # the standby first, on purpose
        run = client.submit(chain_workflow(marks))

        def done(n=3):
            return (
                sum(
                    tk.state == t.TaskState.TASK_STATE_SUCCEEDED
                    for tk in client.get_run(run.id).tasks
                )
                >= n
            )

        Mesh.wait_for(done, 60, "some progress")
        a.kill()
        t0 = time.monotonic()
        Mesh.wait_for(
            lambda: health(b.address, "tether.v1.ControllerService") == SERVING,
            20,
            "the standby to lead",
        )
        takeover = time.monotonic() - t0
        final = run.wait(timeout=120)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
        assert takeover < 2 + 3, takeover  # the lease TTL (2 s) plus a little
        counts = asyncio.run(success_events(etcd.endpoint, prefix))
        assert set(counts.values()) == {1} and len(counts) == 12
        client.close()
    finally:
        mesh.close()
        a.stop()
        b.stop()


def test_graceful_stop_hands_over_at_once(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=10)
    try:
        leader = mesh.start_controller()
        standby = ControllerServer(mesh.config)
        mesh.call(standby.start(wait_for_leadership=False))
        assert leader.is_leader and not standby.is_leader
        t0 = time.monotonic()
        mesh.stop_controller()
        Mesh.wait_for(lambda: standby.is_leader, 5, "the standby to lead")
        assert time.monotonic() - t0 < 3  # not the 10 s TTL: the leader resigned
        mesh.controller = standby
        mesh.add_agent("n1")
        wf = Workflow("after-handover")
        wf.task("x", ["true"])
        assert mesh.client().submit(wf).wait(timeout=30).state == t.RunState.RUN_STATE_SUCCEEDED
    finally:
        mesh.close()


def test_a_deposed_leader_cannot_write(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=10)
    try:
        old = mesh.start_controller()
        old_engine = old.engine
        assert old_engine is not None

        async def usurp():
            # As if the leader's lease had expired while it was paused and another controller
            # had taken the key: the old leader has not noticed yet.
            async with Etcd3Client([etcd.endpoint]) as c:
                lease = await c.lease.grant(30)
                await c.kv.delete(f"{prefix}/leader")
                await c.kv.put(f"{prefix}/leader", "usurper:1", lease=lease.ID)

        asyncio.run(usurp())
        wf = Workflow("from-the-old-leader")
        wf.task("x", ["true"])
        with pytest.raises(NotLeader):
            mesh.call(old_engine.submit(wf.to_proto(), {}, "", ""))
        Mesh.wait_for(lambda: not old.is_leader, 10, "the old leader to step down")

        async def stored_runs():
            async with Etcd3Client([etcd.endpoint]) as c:
                resp = await c.kv.get(
                    f"{prefix}/runs/", range_end=f"{prefix}/runs0", count_only=True
                )
                return resp.count

        assert asyncio.run(stored_runs()) == 0
        assert health(old.address, "tether.v1.ControllerService") == NOT_SERVING
    finally:
        mesh.close()
