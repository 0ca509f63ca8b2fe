"""On an idle mesh a small run's first tasks are bound in the submit's own transaction (one
etcd write fewer before they start); with tasks already waiting, a new run queues behind."""

from __future__ import annotations

import sys

from etcd3aio import Etcd3Client
from helpers import Mesh

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

S = t.TaskState


async def _first_version(endpoint: str, key: str) -> tuple[t.TaskRun, int]:
    """The task record as it was created, and the revision that created it."""
    async with Etcd3Client([endpoint]) as c:
        now = await c.kv.get(key)
        (kv,) = now.kvs
        then = await c.kv.get(key, revision=kv.create_revision)
        return t.TaskRun.FromString(then.kvs[0].value), kv.create_revision


def test_an_idle_mesh_binds_the_first_tasks_in_the_submit(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        client = mesh.client()
        wf = Workflow("quick")
        a = wf.task("a", [sys.executable, "-c", "pass"])
        wf.task("b", [sys.executable, "-c", "pass"], depends_on=[a])
        run = client.submit(wf)
        assert run.wait(timeout=30).state == t.RunState.RUN_STATE_SUCCEEDED
        keys = mesh.controller.store.keys
        first_a, rev_a = mesh.call(_first_version(etcd.endpoint, keys.task(run.id, "a")))
        first_b, rev_b = mesh.call(_first_version(etcd.endpoint, keys.task(run.id, "b")))
        # Created already bound to n1, in the transaction that created the run.
        assert (first_a.state, first_a.node, first_a.attempt) == (S.TASK_STATE_SCHEDULED, "n1", 1)
        assert first_b.state == S.TASK_STATE_PENDING and rev_b == rev_a
        (done,) = [tk for tk in run.status().tasks if tk.spec.name == "a"]
        assert done.attempt == 1 and [x.node for x in done.attempts] == ["n1"]
    finally:
        mesh.close()


def test_a_run_behind_waiting_tasks_is_not_bound_at_submit(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1", max_tasks=1)
        client = mesh.client()
        busy = Workflow("busy")
        for i in range(2):  # one runs, one waits in the queue
            busy.task(f"s{i}", [sys.executable, "-c", "import time; time.sleep(1)"])
        first = client.submit(busy)
        mesh.wait_for(lambda: mesh.controller.engine._cache.ready, 10, "a task waiting")
        wf = Workflow("later")
        wf.task("x", [sys.executable, "-c", "pass"])
        run = client.submit(wf)
        keys = mesh.controller.store.keys
        created, _ = mesh.call(_first_version(etcd.endpoint, keys.task(run.id, "x")))
        assert created.state == S.TASK_STATE_READY
        assert run.wait(timeout=30).state == t.RunState.RUN_STATE_SUCCEEDED
        assert first.wait(timeout=30).state == t.RunState.RUN_STATE_SUCCEEDED
    finally:
        mesh.close()


def test_the_bound_assignments_go_out_before_the_submit_is_answered(
    etcd, prefix, tmp_path, monkeypatch
):
    """On an idle mesh the task's start waits on nothing the submit's answer needs: the
    agents' stream writers take the assignments before the handler logs and answers."""
    from tether.controller import records, service

    order: list[str] = []
    outgoing = records.AgentSession.outgoing

    async def recorded_outgoing(self):
        async for msg in outgoing(self):
            parts = msg.batch.messages if msg.HasField("batch") else [msg]
            order.extend(f"assign {m.assign.ref.task}" for m in parts if m.HasField("assign"))
            yield msg

    submit = service.ControllerServicer.SubmitWorkflow

    async def recorded_submit(self, request, context):
        response = await submit(self, request, context)
        order.append(f"answer {request.spec.name}")
        return response

    monkeypatch.setattr(records.AgentSession, "outgoing", recorded_outgoing)
    monkeypatch.setattr(service.ControllerServicer, "SubmitWorkflow", recorded_submit)
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        client = mesh.client()
        for i in range(3):
            wf = Workflow(f"one{i}")
            wf.task(f"x{i}", [sys.executable, "-c", "pass"])
            assert client.submit(wf).wait(timeout=30).state == t.RunState.RUN_STATE_SUCCEEDED
        expected = [e for i in range(3) for e in (f"assign x{i}", f"answer one{i}")]
        assert order == expected, order
    finally:
        mesh.close()
