"""Store.create, the transaction a large submit writes its chunks with: every key or none,
at one revision, and only while the controller's fence (its leader key) holds."""

from __future__ import annotations

import asyncio

import pytest
from etcd3aio._protobuf import Compare

from tether.controller.errors import NotLeader
from tether.controller.store import Put, Store


def test_create_writes_every_key_or_none_and_keeps_the_fence(etcd, prefix):
    async def main():
        store = Store([etcd.endpoint], prefix, timeout=3)
        await store.connect()
        try:
            a, b, c = f"{prefix}/a", f"{prefix}/b", f"{prefix}/c"
            ok, revision = await store.create([(a, b"1"), (b, b"2")])
            assert ok
            kvs = [await store.get(k) for k in (a, b)]
            assert [kv.value for kv in kvs] == [b"1", b"2"]
            assert {kv.mod_revision for kv in kvs} == {revision}
            assert store.max_request_bytes == len(a) + len(b) + 2

            # One key exists: nothing is written, nothing is overwritten.
            ok, _ = await store.create([(c, b"3"), (a, b"x")])
            assert not ok
            assert await store.get(c) is None and (await store.get(a)).value == b"1"

            # Leading: the fence holds while the leader key is the one it names.
            leader = store.keys.leader
            _, created = await store.txn([], [Put(leader, b"me")], fenced=False)
            store.fence = fence(leader, created)
            assert (await store.create([(c, b"3")]))[0]
            # Another controller's leader key: the write fails, as NotLeader.
            await store.delete_prefix(leader)
            await store.txn([], [Put(leader, b"other")], fenced=False)
            with pytest.raises(NotLeader):
                await store.create([(f"{prefix}/d", b"4")])
            assert await store.get(f"{prefix}/d") is None
        finally:
            await store.close()

    asyncio.run(main())


def fence(key: str, revision: int) -> Compare:
    return Compare(
        key=key.encode(),
        target=Compare.CompareTarget.CREATE,
        result=Compare.CompareResult.EQUAL,
        create_revision=revision,
    )
