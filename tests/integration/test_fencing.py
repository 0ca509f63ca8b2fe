"""Agents fence themselves: out of contact for longer than their grace, they stop their
attempts before the controller may start them elsewhere, so two copies never overlap; a
shorter partition costs nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from helpers import Mesh, TcpProxy, wait_for

from tether.agent.runtimes.reaper import alive, start_ticks
from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow


def recorder(log: Path, seconds: float) -> Workflow:
    """One task that appends {attempt, pid, start} at start, and {attempt, end} when it ends
    by itself (a killed attempt writes no end)."""
    code = (
        "import json,os,time,sys;"
        f"f=open({str(log)!r},'a');"
        "f.write(json.dumps({'attempt': int(os.environ['TETHER_ATTEMPT']), 'pid': os.getpid(),"
        " 'start': time.time()})+'\\n'); f.flush();"
        f"time.sleep({seconds});"
        "f.write(json.dumps({'attempt': int(os.environ['TETHER_ATTEMPT']), 'end': time.time()})"
        "+'\\n')"
    )
    wf = Workflow("fenced")
    wf.task("work", [sys.executable, "-c", code])  # retries=0: a lost attempt must not count
    return wf


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_partition_longer_than_the_grace_stops_the_attempt_before_its_copy_starts(
    etcd, prefix, tmp_path
):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    mesh.start_controller()
    proxy = TcpProxy(mesh.address)
    try:
        n1 = mesh.add_agent("n1", controller=proxy.address)
        log = tmp_path / "attempts.jsonl"
        client = mesh.client()
        run = client.submit(recorder(log, 4))
        wait_for(lambda: records(log), 20, "attempt 1 started")
        first = records(log)[0]
        ticks = start_ticks(first["pid"])
        mesh.add_agent("n2")
        proxy.pause()
        died = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and died is None:
            if not alive(first["pid"], ticks):
                died = time.time()
            time.sleep(0.005)
        assert died is not None, "the partitioned agent did not stop its attempt"
        wait_for(lambda: len([r for r in records(log) if "start" in r]) == 2, 20, "attempt 2")
        second = [r for r in records(log) if "start" in r][1]
        assert second["attempt"] == 2
        assert died <= second["start"], f"overlap of {died - second['start']:.3f}s"
        proxy.resume()
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        (task,) = final.tasks
        assert task.node == "n2"
        assert task.attempts[0].state == t.TaskState.TASK_STATE_LOST
        # The partitioned agent's report comes in when it is back, and is acknowledged.
        wait_for(lambda: not n1.runner.pending_reports(), 20, "fenced report acknowledged")
        assert n1.fenced == 1
        assert [r["attempt"] for r in records(log) if "end" in r] == [2]
    finally:
        mesh.close()
        proxy.close()


def test_partition_shorter_than_the_grace_costs_nothing(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=3)
    mesh.start_controller()
    proxy = TcpProxy(mesh.address)
    try:
        n1 = mesh.add_agent("n1", controller=proxy.address)
        log = tmp_path / "attempts.jsonl"
        run = mesh.client().submit(recorder(log, 3))
        wait_for(lambda: records(log), 20, "attempt 1 started")
        proxy.pause()
        time.sleep(0.8)
        proxy.resume()
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        assert [r["attempt"] for r in records(log)] == [1, 1]  # started once, ended by itself
        assert n1.fenced == 0 and final.tasks[0].attempt == 1
    finally:
        mesh.close()
        proxy.close()


def test_grace_is_reported_and_holds_the_retry(etcd, prefix, tmp_path):
    """An agent with a disconnect grace longer than the lease: the node is lost at the TTL,
    but its attempt's copy waits until the grace has passed since the last contact."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    mesh.start_controller()
    proxy = TcpProxy(mesh.address)
    try:
        mesh.add_agent("n1", controller=proxy.address, disconnect_grace=4.0)
        log = tmp_path / "attempts.jsonl"
        mesh.client().submit(recorder(log, 30))
        wait_for(lambda: records(log), 20, "attempt 1 started")
        first = records(log)[0]
        ticks = start_ticks(first["pid"])
        mesh.add_agent("n2")
        proxy.pause()
        paused = time.time()
        died = None
        while died is None and time.time() - paused < 20:
            if not alive(first["pid"], ticks):
                died = time.time()
            time.sleep(0.005)
        wait_for(lambda: len(records(log)) >= 2, 20, "attempt 2")
        second = records(log)[1]
        assert died is not None and died <= second["start"]
        # Not before the agent's grace (4 s, less the heartbeat interval it may have been
        # into when the partition began), though the lease (2 s) expired long before.
        assert second["start"] - paused > 3.0
    finally:
        mesh.close()
        proxy.close()
