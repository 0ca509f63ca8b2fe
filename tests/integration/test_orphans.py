"""No orphans: a task dies with its SIGKILLed agent, unless the agent leaves it running for the
next agent on the node, which adopts it when current or stops it when stale."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import Mesh, agent_process, wait_for

from tether.agent.runtimes.reaper import alive, start_ticks
from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

S = t.TaskState


def start_agent(mesh: Mesh, name: str, work_dir: Path, *args: str) -> subprocess.Popen:
    return agent_process(mesh.address, name, work_dir, *args)


def sleeper(pid_file: Path, seconds: float) -> Workflow:
    """A task that writes its pid (one line per attempt), then sleeps."""
    code = (
        f"import os,time; open({str(pid_file)!r},'a').write(str(os.getpid())+'\\n'); "
        f"time.sleep({seconds})"
    )
    wf = Workflow("sleepy")
    wf.task("sleep", [sys.executable, "-c", code], retries=2)
    return wf


def pids(pid_file: Path) -> list[int]:
    return [int(x) for x in pid_file.read_text().split()] if pid_file.exists() else []


def node_names(mesh: Mesh) -> list[str]:
    return sorted(n.name for n in mesh.client().nodes())


def test_sigkilled_agents_task_is_gone_within_a_second(mesh: Mesh, tmp_path):
    agent = start_agent(mesh, "n1", tmp_path / "n1")
    try:
        wait_for(lambda: node_names(mesh) == ["n1"], 20, "n1 registered")
        pid_file = tmp_path / "pids"
        mesh.client().submit(sleeper(pid_file, 60))
        wait_for(lambda: pids(pid_file), 20, "task started")
        (pid,) = pids(pid_file)
        ticks = start_ticks(pid)
        assert alive(pid, ticks)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        killed = time.monotonic()
        wait_for(lambda: not alive(pid, ticks), 1.0, "the task to die with its agent")
        assert time.monotonic() - killed < 1.0
    finally:
        agent.kill()
        agent.wait()


def test_left_running_task_is_adopted_by_the_next_agent(etcd, prefix, tmp_path):
    # A lease far longer than an agent's start-up on a loaded machine: the node must still be
    # alive when the second agent registers, or its attempt is (rightly) lost and run again.
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=15)
    mesh.start_controller()
    pid_file = tmp_path / "pids"
    first = start_agent(mesh, "n1", tmp_path / "n1", "--leave-running")
    wait_for(lambda: node_names(mesh) == ["n1"], 20, "n1 registered")
    client = mesh.client()
    run = client.submit(sleeper(pid_file, 3))
    wait_for(lambda: pids(pid_file), 20, "task started")
    (pid,) = pids(pid_file)
    ticks = start_ticks(pid)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(0.3)
    assert alive(pid, ticks), "--leave-running keeps the task"
    second = start_agent(mesh, "n1", tmp_path / "n1", "--leave-running")
    try:
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        (task,) = final.tasks
        assert task.attempt == 1 and task.exit_code == 0  # adopted, not run again
        assert pids(pid_file) == [pid]
    finally:
        second.terminate()
        second.wait(10)
        mesh.close()


def test_stale_left_running_task_is_stopped_when_its_agent_returns(mesh: Mesh, tmp_path):
    """n1 dies for longer than the lease: its attempt is run again on n2; when n1 comes back
    with the old attempt still running, the controller has it stopped."""
    pid_file = tmp_path / "pids"
    first = start_agent(mesh, "n1", tmp_path / "n1", "--leave-running")
    wait_for(lambda: node_names(mesh) == ["n1"], 20, "n1 registered")
    client = mesh.client()
    run = client.submit(sleeper(pid_file, 30))
    wait_for(lambda: pids(pid_file), 20, "task started")
    (old,) = pids(pid_file)
    old_ticks = start_ticks(old)
    first.send_signal(signal.SIGKILL)
    first.wait()
    n2 = mesh.add_agent("n2")
    wait_for(lambda: len(pids(pid_file)) == 2, 20, "the attempt run again on n2")
    assert client.get_run(run.id).tasks[0].node == "n2"
    second = start_agent(mesh, "n1", tmp_path / "n1", "--leave-running")
    try:
        wait_for(lambda: not alive(old, old_ticks), 20, "the stale attempt stopped")
        assert n2.runner.running_refs()  # the current attempt runs on
        client.cancel(run.id)
    finally:
        second.terminate()
        second.wait(10)
