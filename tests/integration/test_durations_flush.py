"""Learned durations at shutdown: observations not written yet are written when the engine
stops, and nothing is written after (a write on a closed store was a warning at every
controller stop, and the last second of observations was lost)."""

from __future__ import annotations

import asyncio

from helpers import with_store

from tether.api.v1 import types_pb2 as t
from tether.controller import durations as durations_module
from tether.controller.durations import Durations
from tether.controller.store import Store


def test_observations_are_written_at_close_and_nothing_after(etcd, prefix, monkeypatch):
    # A long delay: only close() can have written the record.
    monkeypatch.setattr(durations_module, "_WRITE_DELAY", 0.3)

    async def body(store: Store):
        d = Durations(store)
        d.observe("wf", "train", 2.0)
        d.observe("wf", "score", 0.5)
        await d.close()
        kv = await store.get(d.key("wf"))
        assert kv is not None, "observations lost at close"
        assert dict(t.LearnedDurations.FromString(kv.value).seconds) == {
            "train": 2.0,
            "score": 0.5,
        }
        txns = store.txn_count
        await asyncio.sleep(0.5)  # past the write delay: the cancelled timer stays quiet
        assert store.txn_count == txns

    with_store(etcd, prefix, body)


def test_a_write_in_flight_is_finished_and_later_observations_are_not_written(
    etcd, prefix, monkeypatch
):
    monkeypatch.setattr(durations_module, "_WRITE_DELAY", 0.0)

    async def body(store: Store):
        d = Durations(store)
        d.observe("wf", "train", 3.0)
        while not d._writes:  # the timer fired: its write is on its way to etcd
            await asyncio.sleep(0)
        await d.close()
        kv = await store.get(d.key("wf"))
        assert kv is not None, "a write in flight was cancelled at close"
        txns = store.txn_count
        d.observe("wf", "score", 1.0)  # a report arriving while the engine stops
        await asyncio.sleep(0.2)
        assert store.txn_count == txns

    with_store(etcd, prefix, body)
