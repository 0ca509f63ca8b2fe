"""A controller killed with SIGKILL mid-run and started again resumes the run from etcd."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import grpc
import pytest
from etcd3aio import Etcd3Client, prefix_range_end
from mesh import Mesh

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import free_port
from tether.sdk import Client, Workflow

SUCCEEDED = t.TaskState.TASK_STATE_SUCCEEDED


class ControllerProcess:
    """`tether controller` as a real subprocess, on a fixed port so agents find it again."""

    def __init__(self, etcd: str, prefix: str, log_path) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "controller",
            "--etcd",
            etcd,
            "--prefix",
            prefix,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--lease-ttl",
            "2",
        ]
        self.log = open(log_path, "ab")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, leader: bool = True) -> None:
        """Start, and wait until it leads (or, with ``leader=False``, until it serves)."""
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, "TETHER_LOG_FORMAT": "json"},
        )
        client = Client(self.address, timeout=2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if leader:
                    client.nodes()
                else:
                    _health(self.address, "")
                client.close()
                return
            except Exception:
                time.sleep(0.1)
        raise AssertionError("controller did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _health(address: str, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            .status
        )


def _chain_workflow(marks) -> Workflow:
    """Two parallel chains of short tasks; every execution appends to a marker file."""
    code = (
        "import os,time,json;"
        f"open(os.path.join({str(marks)!r}, os.environ['TETHER_TASK']), 'a')"
        ".write(os.environ['TETHER_ATTEMPT'] + '\\n');"
        "time.sleep(0.4);"
        "json.dump({'ok': os.environ['TETHER_TASK']}, open(os.environ['TETHER_OUTPUT_FILE'], 'w'))"
    )
    wf = Workflow("crashy")
    for chain in ("x", "y"):
        prev = None
        for i in range(6):
            prev = wf.task(
                f"{chain}{i}",
                [sys.executable, "-c", code],
                depends_on=[prev] if prev else [],
                cpu=1,
            )
    return wf


async def _success_events(endpoint: str, prefix: str) -> Counter:
    """How many times etcd saw each task key move into SUCCEEDED (its full history)."""
    counts: Counter = Counter()
    async with Etcd3Client([endpoint]) as c:
        key = prefix + "/tasks/"
        current = await c.kv.get(key, range_end=prefix_range_end(key))
        head = max(kv.mod_revision for kv in current.kvs)
        async for resp in c.watch.watch(
            key, range_end=prefix_range_end(key), start_revision=1, prev_kv=True
        ):
            for ev in resp.events:
                new = t.TaskRun.FromString(ev.kv.value) if ev.kv.value else None
                old = t.TaskRun.FromString(ev.prev_kv.value) if ev.prev_kv.value else None
                if new and new.state == SUCCEEDED and (old is None or old.state != SUCCEEDED):
                    counts[new.spec.name] += 1
            if resp.events and resp.events[-1].kv.mod_revision >= head:
                break
    return counts


@pytest.mark.timeout(240)
def test_sigkill_controller_mid_run_resumes_and_records_each_completion_once(
    etcd, prefix, tmp_path
):
    ctl = ControllerProcess(etcd.endpoint, prefix, tmp_path / "controller.log")
    ctl.start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        mesh.add_agent("n1", controller=ctl.address, cpu=1)
        mesh.add_agent("n2", controller=ctl.address, cpu=1)
        client = Client(ctl.address, timeout=10)
        run = client.submit(_chain_workflow(marks))
        kills = 0
        for done_before_kill in (1, 4, 7):  # of 12: always mid-run

            def progressed(n=done_before_kill):
                return sum(tk.state == SUCCEEDED for tk in client.get_run(run.id).tasks) >= n

            Mesh.wait_for(progressed, 60, f"{done_before_kill} tasks done")
            assert client.get_run(run.id).state == t.RunState.RUN_STATE_RUNNING
            ctl.kill()
            kills += 1
            time.sleep(0.3)  # agents keep running and finishing tasks while it is down
            ctl.start()
        final = run.wait(timeout=120)
        assert kills == 3
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
        assert len(final.tasks) == 12
        for tk in final.tasks:
            assert tk.state == SUCCEEDED, tk
            assert [a.state for a in tk.attempts].count(SUCCEEDED) == 1, tk.attempts
            runs_on_agents = (marks / tk.spec.name).read_text().split()
            # At-least-once execution, but never a second attempt while the first one counted.
            assert str(tk.attempt) in runs_on_agents
        counts = asyncio.run(_success_events(etcd.endpoint, prefix))
        assert counts == Counter({tk.spec.name: 1 for tk in final.tasks})
        client.close()
    finally:
        mesh.close()
        ctl.stop()


def _layered_workflow(marks, layers: int = 10, width: int = 20) -> Workflow:
    """``layers`` times ``width`` tasks; each depends on two tasks of the layer before. Every
    execution records its start and end (with attempt number) from the agent's side."""
    code = (
        "import os,time,json;"
        f"p=os.path.join({str(marks)!r}, os.environ['TETHER_TASK']);"
        "a=os.environ['TETHER_ATTEMPT'];"
        "open(p,'a').write(f'start {a} {time.time()}\\n');"
        "time.sleep(0.5);"
        "open(p,'a').write(f'end {a} {time.time()}\\n');"
        "json.dump({'ok': 1}, open(os.environ['TETHER_OUTPUT_FILE'], 'w'))"
    )
    wf = Workflow("layers")
    for layer in range(layers):
        for i in range(width):
            deps = [] if layer == 0 else [f"l{layer - 1}-{i}", f"l{layer - 1}-{(i + 1) % width}"]
            wf.task(f"l{layer}-{i}", [sys.executable, "-c", code], depends_on=deps, cpu=0.5)
    return wf


@pytest.mark.timeout(300)
def test_ten_random_sigkills_during_a_200_task_run(etcd, prefix, tmp_path):
    import random

    rng = random.Random(20261124)
    ctl = ControllerProcess(etcd.endpoint, prefix, tmp_path / "controller.log")
    ctl.start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        for n in ("n1", "n2"):
            mesh.add_agent(n, controller=ctl.address, cpu=2, max_tasks=3)
        client = Client(ctl.address, timeout=10)
        run = client.submit(_layered_workflow(marks))
        kills = 0
        while kills < 12:
            time.sleep(rng.uniform(0.2, 0.9))
            if client.get_run(run.id).state != t.RunState.RUN_STATE_RUNNING:
                break
            ctl.kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 0.5))  # down for a moment: shorter than the lease
            ctl.start()
        final = run.wait(timeout=180)
        assert kills >= 10, f"the run finished after only {kills} kills"
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
        assert len(final.tasks) == 200
        for tk in final.tasks:
            assert tk.state == SUCCEEDED
            assert [a.state for a in tk.attempts].count(SUCCEEDED) == 1
            # What the agents saw: attempts of one task never ran at the same time.
            spans: dict[str, list[float]] = {}
            for line in (marks / tk.spec.name).read_text().split("\n"):
                if line:
                    _kind, attempt, ts = line.split()
                    spans.setdefault(attempt, []).append(float(ts))
            intervals = sorted(spans.values())
            for earlier, later in itertools.pairwise(intervals):
                assert earlier[-1] <= later[0], f"{tk.spec.name}: overlapping attempts {spans}"
            assert str(tk.attempt) in spans
        counts = asyncio.run(_success_events(etcd.endpoint, prefix))
        assert counts == Counter({tk.spec.name: 1 for tk in final.tasks})
        client.close()
    finally:
        mesh.close()
        ctl.stop()
