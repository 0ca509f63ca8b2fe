"""A controller that lost etcd campaigns again by itself and resumes its runs: a lone etcd
stopped for 5 s and started again costs no Tether restart and no work."""

from __future__ import annotations

import sys
import time

from helpers import Mesh, wait_for

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import EtcdProcess
from tether.sdk import Workflow


def test_controller_serves_again_after_a_lone_etcd_restarts(tmp_path, prefix):
    etcd = EtcdProcess(tmp_path / "etcd").start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    try:
        mesh.start_controller()
        agent = mesh.add_agent("n1")
        wf = Workflow("through-an-etcd-restart")
        prev = None
        for i in range(12):
            prev = wf.task(
                f"t{i}",
                [sys.executable, "-c", "import time; time.sleep(0.5)"],
                depends_on=[prev] if prev else [],
            )
        client = mesh.client()
        run = client.submit(wf)
        wait_for(
            lambda: client.get_run(run.id).tasks[2].state == t.TaskState.TASK_STATE_SUCCEEDED,
            20,
            "the run under way",
        )
        terms = mesh.controller.terms
        etcd.stop()
        time.sleep(5)
        etcd.start()
        restarted = time.monotonic()
        # The same controller object leads again: no Tether process was restarted.
        wait_for(
            lambda: mesh.controller.terms > terms and mesh.controller.is_leader,
            30,
            "a new leadership term",
        )
        final = run.wait(timeout=60)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        assert all(task.state == t.TaskState.TASK_STATE_SUCCEEDED for task in final.tasks)
        assert agent.connected.is_set()
        assert time.monotonic() - restarted < 60
    finally:
        mesh.close()
        etcd.stop()
