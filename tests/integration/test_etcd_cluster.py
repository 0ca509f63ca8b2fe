"""A 3-member etcd cluster under one controller: losing one member changes nothing users
see; losing quorum answers UNAVAILABLE saying etcd has no quorum; quorum back → service
back within the leader TTL, nothing lost, no Tether process restarted."""

from __future__ import annotations

import sys
import time

import pytest
from helpers import ControllerProcess, EtcdCluster, Mesh, wait_for

from tether.api.v1 import types_pb2 as t
from tether.sdk import Client, Workflow
from tether.sdk.errors import TimeoutError as SdkTimeout
from tether.sdk.errors import UnavailableError


def _chain(n: int) -> Workflow:
    wf = Workflow("through-etcd-failures")
    prev = None
    for i in range(n):
        prev = wf.task(
            f"t{i}",
            [sys.executable, "-c", "import time; time.sleep(0.3)"],
            depends_on=[prev] if prev else [],
        )
    return wf


@pytest.mark.timeout(180)
def test_one_member_lost_changes_nothing_quorum_lost_then_back(tmp_path, prefix):
    cluster = EtcdCluster(tmp_path / "etcd").start()
    c = ControllerProcess(cluster.endpoints, prefix, tmp_path / "c.log", ("--lease-ttl", "10"))
    mesh = Mesh(cluster.endpoints.split(",")[0], prefix, tmp_path / "agents")
    client = Client(timeout=5)
    try:
        c.start()
        client = Client(c.address, timeout=5)
        mesh.add_agent("n1", controller=c.address, reconnect_initial=0.2, reconnect_max=10.0)
        run = client.submit(_chain(20))
        wait_for(lambda: run.status().tasks[1].state == t.TaskState.TASK_STATE_SUCCEEDED, 30, "")
        cluster.kill("m0")
        # One member down: calls keep working, the run goes on.
        for _ in range(10):
            assert client.get_run(run.id).id == run.id
            assert [n.name for n in client.nodes()] == ["n1"]
        done = sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in run.status().tasks)
        wait_for(
            lambda: (
                sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in run.status().tasks)
                > done
            ),
            20,
            "progress with a member down",
        )
        cluster.kill("m1")
        # No quorum: calls answer UNAVAILABLE and say why.
        deadline = time.monotonic() + 30
        message = ""
        while time.monotonic() < deadline:
            try:
                client.nodes()
            except UnavailableError as e:
                message = e.message
                if "quorum" in message:
                    break
            except SdkTimeout:  # the controller still waits on etcd itself
                pass
            time.sleep(0.2)
        assert "etcd has no quorum" in message, message
        cluster.start("m0")
        cluster.start("m1")
        back = time.monotonic()
        wait_for(lambda: _serves(client), 30, "service back")
        took = time.monotonic() - back
        print(f"quorum back: serving after {took:.2f}s")
        assert took < 3 + 2, took  # the leader TTL, and a little
        final = run.wait(timeout=90)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
        assert all(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in final.tasks)
        assert c.proc is not None and c.proc.poll() is None  # never restarted
    finally:
        client.close()
        mesh.close()
        c.stop()
        cluster.stop()


def _serves(client: Client) -> bool:
    try:
        return bool(client.nodes())
    except (UnavailableError, SdkTimeout):
        return False
