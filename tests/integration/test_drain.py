"""Cordon and drain: no new placements on a cordoned node; a drain lets attempts finish and at
its deadline stops the rest, which run again elsewhere without using up their retries."""

from __future__ import annotations

import sys

from helpers import Mesh, assert_one_line_error, tether, wait_for

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import free_port
from tether.sdk import Workflow

S = t.TaskState


def states(mesh: Mesh) -> dict[str, str]:
    return {n.name: n.schedule_state for n in mesh.client().nodes()}


def quick(name: str, n: int) -> Workflow:
    wf = Workflow(name)
    for i in range(n):
        wf.task(f"t{i}", [sys.executable, "-c", "pass"], cpu=1)
    return wf


def test_cordoned_node_gets_no_new_work_even_after_a_controller_restart(etcd, prefix, tmp_path):
    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        mesh.add_agent("n1")
        mesh.add_agent("n2")
        client = mesh.client()
        client.cordon_node("n1")
        assert states(mesh) == {"n1": "cordoned", "n2": "ready"}
        run = client.submit(quick("cordoned", 6)).wait(timeout=30)
        assert {task.node for task in run.tasks} == {"n2"}
        # The cordon is in etcd, not only in the leader's memory.
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        wait_for(lambda: len(mesh.client().nodes()) == 2, 20, "nodes back")
        assert states(mesh)["n1"] == "cordoned"
        run = mesh.client().submit(quick("still-cordoned", 4)).wait(timeout=30)
        assert {task.node for task in run.tasks} == {"n2"}
        mesh.client().uncordon_node("n1")
        assert states(mesh) == {"n1": "ready", "n2": "ready"}
    finally:
        mesh.close()


def test_drain_stops_what_outlives_the_deadline_and_it_runs_elsewhere_for_free(mesh: Mesh):
    mesh.add_agent("n1")
    mesh.add_agent("n2")
    client = mesh.client()
    client.cordon_node("n2")  # so that the work starts on n1
    code = "import os,time; time.sleep(30 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"
    wf = Workflow("drained")
    wf.task("long", [sys.executable, "-c", code])  # retries=0: the drain must not count
    run = client.submit(wf)
    wait_for(lambda: client.get_run(run.id).tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
    client.uncordon_node("n2")
    client.drain_node("n1", deadline=0.5)
    assert states(mesh)["n1"] == "draining"
    final = run.wait(timeout=30)
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED
    (task,) = final.tasks
    assert task.node == "n2" and task.attempt == 2
    assert task.attempts[0].state == S.TASK_STATE_LOST
    assert "drained" in task.attempts[0].message
    wait_for(lambda: states(mesh)["n1"] == "drained", 10, "n1 drained")


def test_drain_lets_attempts_that_finish_in_time_finish(mesh: Mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("finishes")
    wf.task("short", [sys.executable, "-c", "import time; time.sleep(1)"])
    run = client.submit(wf)
    wait_for(lambda: client.get_run(run.id).tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
    client.drain_node("n1", deadline=30)
    final = run.wait(timeout=30)
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED and final.tasks[0].attempt == 1
    assert states(mesh)["n1"] == "drained"


def test_cli_cordon_drain_and_errors(mesh: Mesh):
    mesh.add_agent("n1")
    res = tether("nodes", "cordon", "n1", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    listed = tether("nodes", controller=mesh.address)
    assert "cordoned" in listed.stdout
    res = tether("nodes", "drain", "n1", "--deadline", "1m", controller=mesh.address)
    assert res.returncode == 0 and "draining" in res.stdout, res.stderr
    assert_one_line_error(tether("nodes", "cordon", "nope", controller=mesh.address), "nope")
    res = tether("nodes", "uncordon", "n1", controller=mesh.address)
    assert res.returncode == 0
    assert states(mesh) == {"n1": "ready"}
