"""A finished run read back from etcd a page at a time (``Store.pages``): GetRun and the watch
snapshot give every task, in index order, with stored-apart ``depends_on`` lists restored, all
as of one revision; ``Store.range`` keeps its paging, limits and order."""

from __future__ import annotations

import random

import pytest
from helpers import with_store

from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import depends_on
from tether.controller import store as store_module
from tether.controller.cache import Cache
from tether.controller.queries import Queries
from tether.controller.store import Put, Store

TASKS = 10
LONG = 300  # depends_on names of task index 0: stored apart, in parts


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(store_module, "_RANGE_PAGE", 3)  # ten tasks: four pages


async def _finished_run(store: Store, run_id: str) -> None:
    keys = store.keys
    ops = [
        Put(
            keys.run(run_id),
            t.Run(id=run_id, state=t.RunState.RUN_STATE_SUCCEEDED).SerializeToString(),
        )
    ]
    indices = list(range(TASKS))
    random.Random(7).shuffle(indices)  # key order (by name) is not index order
    for i, index in enumerate(indices):
        m = t.TaskRun(run_id=run_id, index=index, state=t.TaskState.TASK_STATE_SUCCEEDED)
        m.spec.name = f"t{i:02d}"
        if index == 0:
            m.spec.depends_on.extend(f"d{j}" for j in range(LONG))
            ops += depends_on.part_puts(keys, m)
        ops.append(Put(keys.task(run_id, m.spec.name), depends_on.stored_record(m)))
    for op in ops:
        await store.txn([], [op], fenced=False)


def _check(run: t.Run) -> None:
    assert [m.index for m in run.tasks] == list(range(TASKS))
    first = run.tasks[0]
    assert list(first.spec.depends_on) == [f"d{j}" for j in range(LONG)]
    assert first.depends_on_parts == 0


def test_get_run_and_the_watch_snapshot_read_every_page_in_index_order(etcd, prefix, small_pages):
    async def body(store: Store) -> None:
        await _finished_run(store, "r1")
        queries = Queries(store, Cache())
        _check(await queries.get_run("r1"))

        # Filled in place, as the GetRun handler does; a reused message is replaced.
        response = controller_pb2.GetRunResponse()
        await queries.get_run("r1", out=response.run)
        assert response.HasField("run")
        _check(response.run)
        stale = t.Run(message="stale")
        stale.tasks.add(index=77)
        _check(await queries.get_run("r1", out=stale))
        assert stale.message == ""

        events = queries.watch_run("r1", 0)
        first = await events.__anext__()
        await events.aclose()
        assert first.HasField("snapshot")
        assert first.run_state == t.RunState.RUN_STATE_SUCCEEDED
        _check(first.snapshot)

    with_store(etcd, prefix, body)


def test_all_pages_are_read_as_of_the_first(etcd, prefix, small_pages):
    async def body(store: Store) -> None:
        await _finished_run(store, "r1")
        queries = Queries(store, Cache())
        real_get = store._client.kv.get
        reads = 0

        async def get(*args, **kwargs):
            nonlocal reads
            result = await real_get(*args, **kwargs)
            reads += 1
            if reads == 2:  # the run record, then the first page of its tasks
                late = t.TaskRun(run_id="r1", index=999)
                late.spec.name = "t09"
                put = Put(store.keys.task("r1", "t09"), late.SerializeToString())
                await store.txn([], [put], fenced=False)
            return result

        store._client.kv.get = get
        run = await queries.get_run("r1")
        store._client.kv.get = real_get
        assert reads > 3  # more than one page was read
        _check(run)  # without the task written after the first page

    with_store(etcd, prefix, body)


def test_range_keeps_limits_order_and_an_empty_answer_across_pages(etcd, prefix, small_pages):
    async def body(store: Store) -> None:
        for i in range(TASKS):
            await store.txn([], [Put(f"{prefix}/k/{i:02d}", b"v")], fenced=False)
        names = lambda kvs: [kv.key.rsplit("/", 1)[1] for kv in kvs]  # noqa: E731
        kvs, revision = await store.range(f"{prefix}/k/")
        assert names(kvs) == [f"{i:02d}" for i in range(TASKS)] and revision > 0
        kvs, _ = await store.range(f"{prefix}/k/", limit=5)
        assert names(kvs) == ["00", "01", "02", "03", "04"]
        kvs, _ = await store.range(
            f"{prefix}/k/", newest_first=True, limit=4, start=f"{prefix}/k/08"
        )
        assert names(kvs) == ["07", "06", "05", "04"]
        kvs, revision = await store.range(f"{prefix}/nothing/")
        assert kvs == [] and revision > 0

    with_store(etcd, prefix, body)


def test_range_since_a_revision_reads_only_the_keys_changed_since_across_pages(
    etcd, prefix, small_pages
):
    async def body(store: Store) -> None:
        revisions = []
        for i in range(TASKS):
            revisions.append(
                (await store.txn([], [Put(f"{prefix}/k/{i:02d}", b"v")], fenced=False))[1]
            )
        # Changed again later: its new revision counts, not the first.
        await store.txn([], [Put(f"{prefix}/k/01", b"w")], fenced=False)
        names = lambda kvs: [kv.key.rsplit("/", 1)[1] for kv in kvs]  # noqa: E731
        kvs, _ = await store.range(f"{prefix}/k/", min_mod_revision=revisions[5])
        assert names(kvs) == ["01", "05", "06", "07", "08", "09"]
        # As of a past revision: neither the later change of 01 nor keys written after it.
        kvs, _ = await store.range(
            f"{prefix}/k/", revision=revisions[7], min_mod_revision=revisions[5]
        )
        assert names(kvs) == ["05", "06", "07"]
        kvs, _ = await store.range(f"{prefix}/k/", min_mod_revision=revisions[-1] + 100)
        assert kvs == []

    with_store(etcd, prefix, body)
