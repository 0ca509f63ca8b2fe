"""WatchRun follows a run through two etcd watches (the run key, its task keys) that are not
ordered with each other. A client resumes after the last revision it saw, so the stream must
not send a change before the changes of earlier revisions: a run event read before the task
changes of its revision (or older) sends those first, read from etcd; and a resume restates
the run's state as of its revision, in case the run's change came after later task changes
and was never seen. (Real etcd; the order in which the two watches deliver is set by the
test.)"""

from __future__ import annotations

import asyncio

from helpers import with_store

from tether.api.v1 import types_pb2 as t
from tether.controller.cache import Cache
from tether.controller.queries import Queries, _Watches
from tether.controller.store import Event, Put, Store

R, S = t.RunState, t.TaskState


def _run(state: int) -> bytes:
    return t.Run(id="r1", state=state).SerializeToString()


def _task(name: str, state: int) -> bytes:
    m = t.TaskRun(run_id="r1", state=state)
    m.spec.name = name
    return m.SerializeToString()


def _scripted(store: Store, events: list[Event]) -> _Watches:
    """The two watches, as if they had brought ``events`` in this order."""
    watches = _Watches(store, store.keys.run("r1"), store.keys.tasks_of("r1"), 0)
    for ev in events:
        watches._put(ev)
    return watches


def _ev(key: str, value: bytes, rev: int) -> Event:
    return Event(key=key, value=value, revision=rev, deleted=False)


async def _put(store: Store, *ops: Put) -> int:
    ok, revision = await store.txn([], list(ops), fenced=False)
    assert ok
    return revision


def _described(events) -> list[tuple[str, int]]:
    return [
        (ev.task.spec.name if ev.HasField("task") else R.Name(ev.run_state), ev.revision)
        for ev in events
    ]


def test_a_run_event_that_comes_first_waits_for_the_task_changes_before_it(etcd, prefix):
    async def body(store: Store) -> None:
        keys = store.keys
        run_key, t1, t2 = keys.run("r1"), keys.task("r1", "t1"), keys.task("r1", "t2")
        a = await _put(store, Put(run_key, _run(R.RUN_STATE_PENDING)))
        b = await _put(store, Put(t1, _task("t1", S.TASK_STATE_READY)))
        c = await _put(store, Put(t1, _task("t1", S.TASK_STATE_RUNNING)))
        d = await _put(
            store,
            Put(t2, _task("t2", S.TASK_STATE_READY)),
            Put(run_key, _run(R.RUN_STATE_RUNNING)),
        )
        e = await _put(store, Put(t1, _task("t1", S.TASK_STATE_SUCCEEDED)))
        f = await _put(store, Put(run_key, _run(R.RUN_STATE_SUCCEEDED)))
        # The run's watch is ahead: its RUNNING (revision d) and its end come before the task
        # changes of revisions b to e. t1 changed twice before d: both changes are sent.
        watches = _scripted(
            store,
            [
                _ev(run_key, _run(R.RUN_STATE_RUNNING), d),
                _ev(t1, _task("t1", S.TASK_STATE_READY), b),
                _ev(t1, _task("t1", S.TASK_STATE_RUNNING), c),
                _ev(run_key, _run(R.RUN_STATE_SUCCEEDED), f),
                _ev(t2, _task("t2", S.TASK_STATE_READY), d),
                _ev(t1, _task("t1", S.TASK_STATE_SUCCEEDED), e),
            ],
        )
        changes = Queries(store, Cache())._changes(watches, run_key, keys.tasks_of("r1"), a, {})
        got = [x async for x in changes]
        assert _described(got) == [
            ("t1", b),
            ("t1", c),
            ("t2", d),
            ("RUN_STATE_RUNNING", d),
            ("t1", e),
            ("RUN_STATE_SUCCEEDED", f),
        ]
        # Task events carry the run's state as last sent.
        assert [x.run_state for x in got if x.HasField("task")] == [R.RUN_STATE_UNSPECIFIED] * 3 + [
            R.RUN_STATE_RUNNING
        ]

    with_store(etcd, prefix, body)


def test_a_run_event_the_task_watch_does_not_catch_up_with_reads_the_task_changes(etcd, prefix):
    async def body(store: Store) -> None:
        keys = store.keys
        run_key, t1, t2 = keys.run("r1"), keys.task("r1", "t1"), keys.task("r1", "t2")
        a = await _put(store, Put(run_key, _run(R.RUN_STATE_RUNNING)))
        b = await _put(store, Put(t1, _task("t1", S.TASK_STATE_SUCCEEDED)))
        c = await _put(
            store,
            Put(t2, _task("t2", S.TASK_STATE_SUCCEEDED)),
            Put(run_key, _run(R.RUN_STATE_SUCCEEDED)),
        )
        # The run's end comes; the task watch stays quiet (slow, say): after a moment the
        # task changes up to the end are read from etcd and sent before it.
        watches = _scripted(store, [_ev(run_key, _run(R.RUN_STATE_SUCCEEDED), c)])
        changes = Queries(store, Cache())._changes(watches, run_key, keys.tasks_of("r1"), a, {})
        got = await asyncio.wait_for(_all(changes), 10)
        assert _described(got) == [("t1", b), ("t2", c), ("RUN_STATE_SUCCEEDED", c)]

    with_store(etcd, prefix, body)


async def _all(changes) -> list:
    return [x async for x in changes]


def test_a_resume_restates_the_run_state_as_of_its_revision(etcd, prefix):
    async def body(store: Store) -> None:
        keys = store.keys
        run_key, t1 = keys.run("r1"), keys.task("r1", "t1")
        await _put(store, Put(run_key, _run(R.RUN_STATE_PENDING)))
        running = await _put(store, Put(run_key, _run(R.RUN_STATE_RUNNING)))
        seen = await _put(store, Put(t1, _task("t1", S.TASK_STATE_RUNNING)))
        queries = Queries(store, Cache())

        async def follow() -> list:
            return [x async for x in queries.watch_run("r1", seen)]

        # A revision ahead of etcd's is waited for, as a watch does, not refused.
        ahead = queries.watch_run("r1", seen + 100)
        first = await asyncio.wait_for(ahead.__anext__(), 5)
        await ahead.aclose()
        assert _described([first]) == [("RUN_STATE_RUNNING", running)]

        # A client saw t1 at ``seen`` but not the run's RUNNING (its watch was behind), and
        # resumes after ``seen``.
        following = asyncio.create_task(follow())
        await asyncio.sleep(0.3)  # the watches are set up
        done = await _put(store, Put(t1, _task("t1", S.TASK_STATE_SUCCEEDED)))
        end = await _put(store, Put(run_key, _run(R.RUN_STATE_SUCCEEDED)))
        got = await asyncio.wait_for(following, 10)
        assert _described(got) == [
            ("RUN_STATE_RUNNING", running),
            ("t1", done),
            ("RUN_STATE_SUCCEEDED", end),
        ]
        assert got[1].run_state == R.RUN_STATE_RUNNING  # not "unspecified" after a resume

        # Resumed at the end: only the final state, not a restatement before it.
        again = [x async for x in queries.watch_run("r1", end)]
        assert _described(again) == [("RUN_STATE_SUCCEEDED", end)]

    with_store(etcd, prefix, body)


def test_task_events_after_a_snapshot_carry_its_run_state(etcd, prefix):
    async def body(store: Store) -> None:
        run_key, t1 = store.keys.run("r1"), store.keys.task("r1", "t1")
        await _put(
            store, Put(run_key, _run(R.RUN_STATE_RUNNING)), Put(t1, _task("t1", S.TASK_STATE_READY))
        )
        events = Queries(store, Cache()).watch_run("r1", 0)
        snapshot = await asyncio.wait_for(events.__anext__(), 5)
        await _put(store, Put(t1, _task("t1", S.TASK_STATE_RUNNING)))
        change = await asyncio.wait_for(events.__anext__(), 5)
        await events.aclose()
        assert snapshot.HasField("snapshot") and change.HasField("task")
        assert change.run_state == R.RUN_STATE_RUNNING

    with_store(etcd, prefix, body)
