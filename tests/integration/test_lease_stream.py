"""Node leases are renewed over one shared keep-alive stream: answers reach the right caller,
an expired lease says so, and the stream is opened again after etcd restarts."""

from __future__ import annotations

import asyncio

import pytest

from tether.controller.etcd_process import EtcdProcess
from tether.controller.store import Store


def test_shared_renewals_answer_each_lease(etcd, prefix):
    async def go():
        store = Store([etcd.endpoint], prefix, timeout=3)
        await store.connect()
        try:
            short = await store.grant_lease(5)
            long = await store.grant_lease(30)
            ttls = await asyncio.gather(*(store.keepalive(lease) for lease in [short, long] * 50))
            assert ttls == [5, 30] * 50
            await store.revoke_lease(short)
            assert await store.keepalive(short) == 0
            assert await store.keepalive(long) == 30
            # The leader's own stream gives the same answer.
            assert await store.keepalive(long, shared=False) == 30
        finally:
            await store.close()

    asyncio.run(go())


def test_the_stream_is_opened_again_after_etcd_restarts(tmp_path, prefix):
    etcd = EtcdProcess(tmp_path / "etcd").start()

    async def go():
        store = Store([etcd.endpoint], prefix, timeout=2)
        await store.connect()
        try:
            lease = await store.grant_lease(60)
            assert await store.keepalive(lease) == 60
            await asyncio.to_thread(etcd.stop)
            with pytest.raises(Exception):  # noqa: B017 - the stream fails or times out
                await store.keepalive(lease, timeout=1)
            await asyncio.to_thread(etcd.start)
            for _ in range(50):
                try:
                    assert await store.keepalive(lease, timeout=1) == 60
                    return
                except Exception as e:  # timeouts and grpc's errors while the channel reconnects
                    last = e
                await asyncio.sleep(0.2)
            raise AssertionError(f"no renewal after the restart: {last!r}")
        finally:
            await store.close()

    try:
        asyncio.run(go())
    finally:
        etcd.stop()
