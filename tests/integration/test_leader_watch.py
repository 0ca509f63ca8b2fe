"""The leader watches its key: a watch that fails is watched again, so a key deleted later
(an operator's recovery) still ends the leadership."""

from __future__ import annotations

import asyncio

from helpers import with_store

from tether.controller import leader as leader_module
from tether.controller.leader import Leadership
from tether.controller.store import Delete, Store


def test_a_failed_key_watch_is_watched_again_and_a_later_delete_still_ends_leadership(
    etcd, prefix, monkeypatch
):
    monkeypatch.setattr(leader_module, "WATCH_RETRY_SECONDS", 0.05)

    async def body(store: Store) -> None:
        real_watch = store.watch
        failed = []

        def watch(key, start):
            if key == store.keys.leader and not failed:
                failed.append(True)
                raise ConnectionError("simulated: etcd unreachable")
            return real_watch(key, start)

        store.watch = watch
        lead = Leadership(store, "c1:7070", ttl=5)
        await lead.acquire()
        try:
            await asyncio.sleep(0.3)  # the watch failed once and was started again
            assert failed and not lead.lost.is_set()
            await store.txn([], [Delete(store.keys.leader)], fenced=False)
            await asyncio.wait_for(lead.lost.wait(), 5)
        finally:
            lead.abandon()

    with_store(etcd, prefix, body)
