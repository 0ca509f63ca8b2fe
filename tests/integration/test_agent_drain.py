"""An agent given SIGTERM drains its node before it exits (``--drain-grace``): nothing new is
placed there, running attempts may finish, and what outlives the grace is stopped and run
again elsewhere without using up its retries."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import Mesh, agent_process, wait_for

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

S = t.TaskState


def spawn_agent(mesh: Mesh, name: str, work_dir: Path, drain_grace: str) -> subprocess.Popen:
    log = work_dir.parent / f"{name}.log"
    return agent_process(mesh.address, name, work_dir, "--drain-grace", drain_grace, log=log)


def schedule_states(mesh: Mesh) -> dict[str, str]:
    return {n.name: n.schedule_state for n in mesh.client().nodes()}


def start_on_n1(mesh: Mesh, tmp_path: Path, drain_grace: str, wf: Workflow):
    proc = spawn_agent(mesh, "n1", tmp_path / "n1", drain_grace)
    client = mesh.client()
    wait_for(lambda: "n1" in schedule_states(mesh), 20, "n1 registered")
    run = client.submit(wf)
    wait_for(lambda: client.get_run(run.id).tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
    assert client.get_run(run.id).tasks[0].node == "n1"
    mesh.add_agent("n2")
    return proc, run


def test_sigterm_lets_the_running_attempt_finish_and_places_nothing_new(mesh, tmp_path):
    wf = Workflow("finishes-during-drain")
    wf.task("short", [sys.executable, "-c", "import time; time.sleep(2)"])
    proc, run = start_on_n1(mesh, tmp_path, "30s", wf)
    try:
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: schedule_states(mesh)["n1"] == "draining", 10, "n1 draining")
        quick = Workflow("placed-elsewhere")
        for i in range(4):
            quick.task(f"q{i}", [sys.executable, "-c", "pass"])
        placed = mesh.client().submit(quick).wait(timeout=30)
        assert placed.state == t.RunState.RUN_STATE_SUCCEEDED
        assert {task.node for task in placed.tasks} == {"n2"}
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        (task,) = final.tasks
        assert (task.node, task.attempt) == ("n1", 1)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_what_outlives_the_drain_grace_is_stopped_and_retried_for_free(mesh, tmp_path):
    code = "import os,time; time.sleep(60 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"
    wf = Workflow("outlives-drain")
    wf.task("long", [sys.executable, "-c", code])  # retries=0: the drain must not count
    proc, run = start_on_n1(mesh, tmp_path, "0.5s", wf)
    try:
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        # The grace, the stop and the acknowledged report; not the task's 60 s.
        assert time.monotonic() - signalled < 15
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        (task,) = final.tasks
        assert (task.node, task.attempt) == ("n2", 2)
        first = task.attempts[0]
        assert first.state == S.TASK_STATE_LOST and "drain grace" in first.message
    finally:
        proc.kill()


def test_drain_grace_zero_keeps_the_old_immediate_stop(mesh, tmp_path):
    code = "import os,time; time.sleep(60 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"
    wf = Workflow("no-drain")
    wf.task("long", [sys.executable, "-c", code], retries=1)
    proc, run = start_on_n1(mesh, tmp_path, "0s", wf)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        assert final.tasks[0].node == "n2"
    finally:
        proc.kill()
