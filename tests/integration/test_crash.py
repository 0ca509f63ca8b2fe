"""A controller killed with SIGKILL mid-run and started again resumes the run from etcd."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter

import pytest
from helpers import SUCCEEDED, ControllerProcess, Mesh, chain_workflow, success_events

from tether.api.v1 import types_pb2 as t
from tether.sdk import Client, Workflow


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
        run = client.submit(chain_workflow(marks))
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
        counts = asyncio.run(success_events(etcd.endpoint, prefix))
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
        counts = asyncio.run(success_events(etcd.endpoint, prefix))
        assert counts == Counter({tk.spec.name: 1 for tk in final.tasks})
        client.close()
    finally:
        mesh.close()
        ctl.stop()
