"""Fast failover: a standby serves and every agent is back within 5 s of the leader's SIGKILL
(default settings); a restarted controller takes its own leadership back at once; standbys
name the leader; no finished task runs again because the controller was away."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from helpers import ControllerProcess, Mesh, chain_workflow, health, success_events

from tether.api.v1 import controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk import Client
from tether.sdk.errors import LEADER_KEY

SERVING = health_pb2.HealthCheckResponse.SERVING
CONTROLLER = "tether.v1.ControllerService"
# The controller's own defaults (ControllerProcess passes a short --lease-ttl otherwise).
DEFAULTS = ("--lease-ttl", "10", "--leader-ttl", "3")
AGENT_DEFAULTS = {"reconnect_initial": 0.2, "reconnect_max": 10.0}


def _registered_everywhere(mesh: Mesh, before: dict[str, int]) -> bool:
    return all(
        agent.connected.is_set() and agent.registrations > before[name]
        for name, (agent, _) in mesh.agents.items()
    )


@pytest.mark.timeout(120)
def test_leader_sigkill_standby_serving_and_agents_back_within_5s(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log", DEFAULTS)
    b = ControllerProcess(etcd.endpoint, prefix, tmp_path / "b.log", DEFAULTS)
    a.start()
    b.start(leader=False)
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    client = Client(f"{a.address},{b.address}", timeout=10)
    try:
        for i in range(4):
            mesh.add_agent(f"n{i}", controller=f"{a.address},{b.address}", **AGENT_DEFAULTS)
        before = {name: agent.registrations for name, (agent, _) in mesh.agents.items()}
        a.kill()
        t0 = time.monotonic()
        Mesh.wait_for(lambda: health(b.address, CONTROLLER) == SERVING, 10, "the standby")
        serving = time.monotonic() - t0
        Mesh.wait_for(lambda: _registered_everywhere(mesh, before), 10, "agents back")
        back = time.monotonic() - t0
        print(f"failover: standby serving after {serving:.2f}s, all agents back after {back:.2f}s")
        assert back < 5, (serving, back)
        assert sorted(n.name for n in client.nodes()) == ["n0", "n1", "n2", "n3"]
    finally:
        client.close()
        mesh.close()
        a.stop()
        b.stop()


@pytest.mark.timeout(120)
def test_restarted_controller_takes_its_leadership_back_and_reruns_nothing(etcd, prefix, tmp_path):
    # A leader TTL far longer than the restart: waiting it out would show.
    a = ControllerProcess(
        etcd.endpoint, prefix, tmp_path / "a.log", ("--lease-ttl", "10", "--leader-ttl", "15")
    )
    a.start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    marks = tmp_path / "marks"
    marks.mkdir()
    client = Client(a.address, timeout=10)
    try:
        mesh.add_agent("n1", controller=a.address, cpu=1, **AGENT_DEFAULTS)
        mesh.add_agent("n2", controller=a.address, cpu=1, **AGENT_DEFAULTS)
        run = client.submit(chain_workflow(marks))
        Mesh.wait_for(
            lambda: (
                sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in run.status().tasks) >= 3
            ),
            60,
            "some progress",
        )
        a.kill()
        time.sleep(1.0)  # tasks finish while no controller runs; their reports wait
        t0 = time.monotonic()
        a.start()
        took = time.monotonic() - t0
        assert took < 5, took  # not the 15 s leader TTL
        final = run.wait(timeout=90)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
        counts = asyncio.run(success_events(etcd.endpoint, prefix))
        assert len(counts) == 12 and set(counts.values()) == {1}, counts
        # Each task ran once: the controller being away is no reason to run one again.
        runs = {p.name: p.read_text().split() for p in marks.iterdir()}
        assert all(v == ["1"] for v in runs.values()), runs
    finally:
        client.close()
        mesh.close()
        a.stop()


@pytest.mark.timeout(60)
def test_a_standby_names_the_leader_and_clients_go_there(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log")
    b = ControllerProcess(etcd.endpoint, prefix, tmp_path / "b.log")
    a.start()
    b.start(leader=False)
    try:
        with grpc.insecure_channel(b.address) as ch:
            stub = controller_pb2_grpc.ControllerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListNodes(controller_pb2.ListNodesRequest(), timeout=5)
        err = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert a.address in err.details()
        assert dict(err.trailing_metadata())[LEADER_KEY] == a.address
        # Given only the standby, the SDK goes to the leader by itself.
        with Client(b.address, timeout=5) as client:
            assert client.nodes() == []
    finally:
        a.stop()
        b.stop()
