"""RunWatch: run-only watches fed by the leader's committed writes."""

from __future__ import annotations

import asyncio

import pytest

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import NotLeader
from tether.controller.records import RunEntry
from tether.controller.run_watch import RunWatch

R = t.RunState


def _write(watch: RunWatch, run: RunEntry, state: int, rev: int) -> None:
    run.msg.state = state
    run.rev = rev
    watch.written(run, run.msg.SerializeToString())


async def _collect(agen) -> list:
    return [ev async for ev in agen]


def test_a_watch_gets_the_committed_changes_until_the_end():
    async def main():
        watch = RunWatch()
        run = RunEntry("/p/runs/r1", t.Run(id="r1", workflow_name="w"), 0)
        assert not watch.can_watch(run)  # nothing written by this controller yet
        _write(watch, run, R.RUN_STATE_PENDING, 5)
        assert watch.can_watch(run)
        task = asyncio.ensure_future(_collect(watch.watch(run, 0)))
        await asyncio.sleep(0)
        run.msg.state = R.RUN_STATE_SUCCEEDED  # changed in memory, not written: not seen
        await asyncio.sleep(0)
        _write(watch, run, R.RUN_STATE_RUNNING, 7)
        _write(watch, run, R.RUN_STATE_SUCCEEDED, 9)
        events = await asyncio.wait_for(task, 5)
        assert events[0].snapshot.state == R.RUN_STATE_PENDING and events[0].revision == 5
        assert [(e.run_state, e.revision) for e in events[1:]] == [
            (R.RUN_STATE_RUNNING, 7),
            (R.RUN_STATE_SUCCEEDED, 9),
        ]
        # Resumed after the end: the final state at once; the waiters are gone.
        events = await _collect(watch.watch(run, 8))
        assert [(e.run_state, e.revision) for e in events] == [(R.RUN_STATE_SUCCEEDED, 9)]
        assert not watch._waiters

    asyncio.run(main())


def test_watches_end_when_leadership_ends():
    async def main():
        watch = RunWatch()
        run = RunEntry("/p/runs/r2", t.Run(id="r2"), 0)
        _write(watch, run, R.RUN_STATE_RUNNING, 3)
        agen = watch.watch(run, 0)
        first = await agen.__anext__()
        assert first.snapshot.state == R.RUN_STATE_RUNNING
        nxt = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)
        watch.stop()
        with pytest.raises(NotLeader):
            await asyncio.wait_for(nxt, 5)
        assert not watch.can_watch(run)

    asyncio.run(main())
