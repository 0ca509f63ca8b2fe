"""HA and etcd in narrow windows (found by a review): a deposed term's submit, a new
leader loading big records, reads of state not yet in etcd. etcd is real; failures are
injected by wrapping store methods (slow etcd) or by what an operator or a second controller
does to etcd."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import Mesh

from tether.api.v1 import types_pb2 as t
from tether.controller.server import ControllerServer
from tether.sdk import Workflow

TXN_BYTES = 16 * 1024


def fan_out(width: int, name: str) -> Workflow:
    wf = Workflow(name)
    for i in range(width):
        wf.task(f"t{i}", ["true"])
    return wf


@pytest.mark.timeout(120)
def test_chunked_submit_of_a_deposed_term_commits_under_the_next_terms_fence(
    etcd, prefix, tmp_path
):
    """The fence is one attribute of the shared Store, not of the term. A large submit still
    writing when its term ends (leader key deleted here; a lease lost to a slow etcd does the
    same) goes on writing after the same controller leads again: its chunks and its commit
    carry the NEW term's fence and succeed, and the run is taken up in the OLD (stopped)
    engine's cache. The new engine loaded etcd before the commit, so it never sees the run:
    the client is told the run was submitted, and it stays PENDING for good."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", submit_txn_bytes=TXN_BYTES)
    try:
        server = mesh.start_controller()
        store = server.store
        old_engine = server.engine
        real_create = store.create
        state = {"deleted": False}

        async def slow_create(items, guard=None):
            # The first chunk write of the submit: the leader key goes (an operator's
            # recovery, or the lease expiring), and etcd is slow to answer this submit's
            # remaining writes, which reach it only after the new term started.
            if not state["deleted"]:
                state["deleted"] = True
                await store._client.kv.delete(store.keys.leader)
            deadline = time.monotonic() + 20
            while server.engine in (None, old_engine) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return await real_create(items, guard)

        store.create = slow_create
        client = mesh.client()
        run = client.submit(fan_out(300, "wide"), request_id="wide-1")
        store.create = real_create
        new_engine = server.engine
        assert new_engine is not None and new_engine is not old_engine
        mesh.add_agent("n1", max_tasks=64)
        # The run was accepted; the current leader must run it.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state_now = client.get_run(run.id).state
            if state_now == t.RunState.RUN_STATE_SUCCEEDED:
                break
            time.sleep(0.2)
        assert run.id in new_engine.runs or client.get_run(run.id).state == (
            t.RunState.RUN_STATE_SUCCEEDED
        ), (
            f"run {run.id} accepted but not known to the current term "
            f"(state {t.RunState.Name(client.get_run(run.id).state)}; "
            f"in the old engine's cache: {run.id in old_engine.runs})"
        )
    finally:
        mesh.close()


@pytest.mark.timeout(120)
def test_a_new_leader_loads_an_unfinished_run_of_tasks_over_4kb(etcd, prefix, tmp_path):
    """Store.pages reads 1,000 keys per etcd range, and the etcd channel keeps gRPC's default
    4 MiB limit on what it receives. A run of 1,000 tasks of ~5 KB each (max_task_bytes is
    256 KB) is accepted and runs; but a page of its task records is ~5 MB, so a controller
    that takes over (failover, restart) fails in load_unfinished with RESOURCE_EXHAUSTED,
    its campaign loop retries for ever, and no controller ever leads again."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        client = mesh.client()
        wf = Workflow("fat-tasks")
        for i in range(1000):
            wf.task(f"t{i}", ["true"], env={"PAYLOAD": "x" * 5000})
        run = client.submit(wf, request_id="fat-1")
        mesh.stop_controller()

        mesh.controller = ControllerServer(mesh.config)
        fut = asyncio.run_coroutine_threadsafe(mesh.controller.start(), mesh.loop)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not mesh.controller.is_leader:
            time.sleep(0.2)
        assert mesh.controller.is_leader, (
            f"no leader after a restart: {mesh.controller.store_error or 'engine start failed'}"
        )
        fut.result(5)
        assert run.id in mesh.controller.engine.runs
    finally:
        mesh.close()


@pytest.mark.timeout(120)
def test_get_run_answers_only_what_etcd_holds(etcd, prefix, tmp_path):
    """GetRun (and ListRuns) of a cached run used to answer the engine's in-memory records,
    which change before the committer writes them: while etcd was slow, a client was told
    the run SUCCEEDED although etcd still held it RUNNING, and a failover then took it back.
    Now a record whose change is on its way answers as etcd holds it."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    release = asyncio.Event()
    try:
        server = mesh.start_controller()
        store = server.store
        mesh.add_agent("n1")
        client = mesh.client()
        wf = Workflow("one")
        wf.task("x", ["sleep", "1"])
        run = client.submit(wf)
        Mesh.wait_for(
            lambda: (
                client.get_run(run.id).state == t.RunState.RUN_STATE_RUNNING
                and client.get_run(run.id).tasks[0].state == t.TaskState.TASK_STATE_RUNNING
            ),
            20,
            "running",
        )
        Mesh.wait_for(lambda: server.engine.committer._idle.is_set(), 10, "flushed")
        real_txn = store.txn

        async def slow_txn(*a, **kw):  # etcd slow to commit the leader's writes
            await release.wait()
            return await real_txn(*a, **kw)

        store.txn = slow_txn
        engine = server.engine
        Mesh.wait_for(
            lambda: engine.committer.pending(engine._cache.runs[run.id].key),
            20,
            "the run's end on its way to etcd",
        )
        seen = {client.get_run(run.id).state for _ in range(20)}
        listed = {r.state for r in client.list_runs() if r.id == run.id}
        assert seen == listed == {t.RunState.RUN_STATE_RUNNING}, (seen, listed)
        assert client.get_run(run.id).tasks[0].state == t.TaskState.TASK_STATE_RUNNING
        mesh.loop.call_soon_threadsafe(release.set)
        Mesh.wait_for(
            lambda: client.get_run(run.id).state == t.RunState.RUN_STATE_SUCCEEDED,
            20,
            "SUCCEEDED once in etcd",
        )
    finally:
        mesh.loop.call_soon_threadsafe(release.set)
        mesh.close()
