"""A run too big for one etcd transaction: written in chunks, invisible until committed,
finished by a retry with the same request id after a submit died half-way, never twice.

The controller gets a small ``submit_txn_bytes`` so that 5,000 tasks take dozens of
transactions; etcd is real, and the failure is injected in the controller's submit path (as if
it lost etcd after some chunks), not in etcd.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
from etcd3aio import Etcd3Client, prefix_range_end
from helpers import Mesh

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import StoreUnavailable
from tether.sdk import Workflow
from tether.sdk.errors import NotFoundError, UnavailableError

TXN_BYTES = 16 * 1024


@pytest.fixture
def big_mesh(etcd, prefix, tmp_path):
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", submit_txn_bytes=TXN_BYTES)
    m.start_controller()
    yield m
    m.close()


def fan_in(width: int, name: str = "fan-in") -> Workflow:
    wf = Workflow(name)
    names = [wf.task(f"t{i}", ["true"]).name for i in range(width)]
    wf.task("join", ["true"], depends_on=names)
    return wf


def keys_under(endpoint: str, prefix: str) -> dict[str, bytes]:
    async def get():
        async with Etcd3Client([endpoint]) as c:
            resp = await c.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
            return {kv.key.decode(): kv.value for kv in resp.kvs}

    return asyncio.run(get())


def break_after(mesh: Mesh, chunks: int) -> threading.Event:
    """Make the controller's chunk writes fail after ``chunks`` of them, until the returned
    event is set."""
    submitter = mesh.controller.engine._submitter
    real = submitter._write_chunk
    healed = threading.Event()
    written = 0
    in_flight = 0

    async def write_chunk(chunk, resumed, pending):
        nonlocal written, in_flight
        written += 1
        if written > chunks and not healed.is_set():
            # Once the chunks before it are written: the failure cancels those still in
            # flight, and which of the first ``chunks`` reached etcd would be left to chance.
            while in_flight:
                await asyncio.sleep(0.005)
            raise StoreUnavailable("etcd went away (injected)")
        in_flight += 1
        try:
            return await real(chunk, resumed, pending)
        finally:
            in_flight -= 1

    submitter._write_chunk = write_chunk
    return healed


def test_chunked_submit_is_invisible_until_committed_and_a_retry_finishes_it(big_mesh, etcd):
    mesh, width = big_mesh, 4999
    client = mesh.client()
    wf = fan_in(width)
    keys = mesh.controller.store.keys
    healed = break_after(mesh, 10)
    with pytest.raises(UnavailableError):
        client.submit(wf, request_id="big-1")

    # Half-written: some task keys exist, but no run record, and nothing reads them.
    pending = keys_under(etcd.endpoint, keys.requests)
    (marker,) = pending.values()
    run_id, _, rest = marker.decode().partition(" ")
    assert rest.endswith(" pending")
    written = keys_under(etcd.endpoint, keys.tasks_of(run_id))
    assert 0 < len(written) < width + 1
    assert keys_under(etcd.endpoint, keys.runs) == {}
    assert [r for r in client.list_runs() if r.workflow_name == "fan-in"] == []
    with pytest.raises(NotFoundError):
        client.get_run(run_id)

    # The retry (twice at once, as a client and its impatient twin would) finishes that run.
    healed.set()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(client.submit(wf, request_id="big-1")))
        for _ in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert [r.id for r in results] == [run_id, run_id]
    again = client.submit(wf, request_id="big-1")
    assert again.id == run_id and again.existing

    runs = [r for r in client.list_runs() if r.workflow_name == "fan-in"]
    assert [r.id for r in runs] == [run_id]
    assert len(keys_under(etcd.endpoint, keys.tasks_of(run_id))) == width + 1
    run = client.get_run(run_id)
    assert len(run.tasks) == width + 1
    join = run.tasks[-1]
    assert join.spec.name == "join" and list(join.spec.depends_on) == [
        f"t{i}" for i in range(width)
    ]
    assert join.depends_on_parts == 0  # replies carry the whole list

    # etcd holds the long list apart: the join's own record stays small.
    stored = t.TaskRun.FromString(
        keys_under(etcd.endpoint, keys.task(run_id, "join"))[keys.task(run_id, "join")]
    )
    assert stored.depends_on_parts > 1 and not stored.spec.depends_on
    assert len(stored.SerializeToString()) < 4096
    # The run's writes were chunked: far below the ~700 KB it would take in one transaction.
    assert 0 < mesh.controller.store.max_request_bytes < 64 * 1024


def test_chunked_run_completes_and_survives_a_controller_restart(big_mesh, etcd):
    mesh = big_mesh
    client = mesh.client()
    wf = fan_in(600, "fan-in-run")
    run = client.submit(wf, request_id="big-2")
    # A new controller loads the run from etcd, long depends_on list and all.
    mesh.stop_controller()
    mesh.start_controller()
    client = mesh.client()
    mesh.add_agent("n1", max_tasks=32)
    final = client.run(run.id).wait(timeout=60)
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    assert all(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in final.tasks)
    assert len(final.tasks) == 601 and len(final.tasks[-1].spec.depends_on) == 600
    assert client.submit(wf, request_id="big-2").id == run.id


def mod_revisions(endpoint: str, prefix: str) -> dict[str, int]:
    async def get():
        async with Etcd3Client([endpoint]) as c:
            resp = await c.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
            return {kv.key.decode(): kv.mod_revision for kv in resp.kvs}

    return asyncio.run(get())


def test_a_run_built_in_slices_is_cached_as_etcd_holds_it(big_mesh, etcd, monkeypatch):
    # Several slices, each written while the next is built: every cached task must carry the
    # revision etcd wrote it at (the committer's compare-and-swap depends on it) and its links.
    monkeypatch.setattr("tether.controller.submit.BUILD_SLICE", 700)
    mesh = big_mesh
    client = mesh.client()
    wf = Workflow("sliced")
    start = wf.task("start", ["true"])
    names = [wf.task(f"t{i}", ["true"], depends_on=[start]).name for i in range(2000)]
    wf.task("join", ["true"], depends_on=names)
    run = client.submit(wf, request_id="sliced-1")
    cached = mesh.controller.engine._cache.runs[run.id]
    revs = mod_revisions(etcd.endpoint, mesh.controller.store.keys.tasks_of(run.id))
    assert len(revs) == len(cached.tasks) == 2002 and cached.unfinished == 2002
    assert {e.key: e.rev for e in cached.tasks.values()} == revs
    assert len(set(revs.values())) > 3  # written in many transactions
    assert cached.tasks["start"].children == names
    assert cached.tasks["t5"].children == ["join"] and cached.tasks["join"].waiting == 2000


def test_a_failed_slice_write_stops_the_build(big_mesh, monkeypatch):
    monkeypatch.setattr("tether.controller.submit.BUILD_SLICE", 500)
    mesh = big_mesh
    submitter = mesh.controller.engine._submitter
    built = []
    real_build = submitter._build_tasks

    def build_tasks(new, lo, hi):
        built.append(lo)
        real_build(new, lo, hi)

    submitter._build_tasks = build_tasks
    break_after(mesh, 0)  # never healed: every chunk write fails
    with pytest.raises(UnavailableError):
        mesh.client().submit(fan_in(4999, "stopped"), request_id="stopped-1")
    # Each attempt (the client retries UNAVAILABLE) stopped after its first failed write,
    # long before its tenth and last slice.
    attempts = [i for i, lo in enumerate(built) if lo == 0] + [len(built)]
    slices = [b - a for a, b in itertools.pairwise(attempts)]
    assert slices and max(slices) < 5, built
