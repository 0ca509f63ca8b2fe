"""The leader compacts etcd's history every ``etcd_compaction_interval``, keeping one
interval of it: without compaction etcd's database grows with every task until its quota
stops all writes."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from etcd3aio import Etcd3Client
from helpers import ControllerProcess, Mesh, R, health, py

from tether.controller.compaction import Compactor
from tether.controller.etcd_process import EtcdProcess
from tether.controller.store import Put, Store
from tether.sdk import TetherError, Workflow


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """An etcd of this module's own: compaction is of the whole keyspace, and other tests read
    the shared etcd's history from its start."""
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd-compaction")).start()
    yield proc
    proc.stop()


async def _readable_at(endpoint: str, key: str, revision: int) -> bool:
    """Whether etcd still has ``key`` as of ``revision`` (False: compacted away)."""
    async with Etcd3Client([endpoint]) as c:
        try:
            await c.kv.get(key.encode(), revision=revision)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.OUT_OF_RANGE, e
            return False
        return True


def test_a_step_compacts_up_to_the_revision_read_one_interval_before(etcd, prefix):
    async def main():
        store = Store([etcd.endpoint], prefix, timeout=3)
        await store.connect()
        try:
            key = f"{prefix}/x"
            _, first = await store.txn([], [Put(key, b"1")])
            compactor = Compactor(store, interval=60)
            previous = await compactor.step(first)  # compacts up to `first`
            _, second = await store.txn([], [Put(key, b"2")])
            assert previous >= first and compactor.compacted == first
            assert not await _readable_at(etcd.endpoint, key, first - 1)
            # What changed within the last interval is still there to resume a watch from.
            assert await _readable_at(etcd.endpoint, key, second)
            assert await store.compact(first) is False  # compacted that far already
        finally:
            await store.close()

    asyncio.run(main())


def test_the_leader_compacts_while_it_runs_workflows(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    controller = mesh.start_controller(etcd_compaction_interval=0.3)
    try:
        mesh.add_agent("n1")
        client = mesh.client()
        wf = Workflow("compacted")
        wf.task("a", py("pass"))
        wf.task("b", py("pass"), depends_on=["a"])
        run = client.submit(wf)
        assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        compactor = controller.engine.compactor
        mesh.wait_for(lambda: compactor.compacted > 0, 10, "a compaction")
        seen = compactor.compacted
        run2 = client.submit(wf)  # later writes are compacted in turn
        assert run2.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        mesh.wait_for(lambda: compactor.compacted > seen, 10, "a later compaction")
        assert run.status().state == R.RUN_STATE_SUCCEEDED  # current state is untouched
        with pytest.raises(TetherError, match="was compacted"):
            list(run.watch(from_revision=1))
    finally:
        mesh.close()


def test_a_negative_interval_is_refused():
    from tether.controller.config import ControllerConfig

    with pytest.raises(ValueError, match="etcd_compaction_interval"):
        ControllerConfig(etcd_compaction_interval=-1)


def test_a_standby_started_after_a_compaction_stands_by_and_takes_over(etcd, prefix, tmp_path):
    # The leader's key is older than etcd's compacted history when the standby comes: the
    # standby watched from the key's creation, which etcd no longer had, and looped.
    fast = ["--etcd-compaction-interval", "0.3s"]
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log", fast)
    b = ControllerProcess(etcd.endpoint, prefix, tmp_path / "b.log", fast)
    a.start()
    try:

        async def push() -> int:
            async with Etcd3Client([etcd.endpoint]) as c:
                for i in range(20):
                    resp = await c.kv.put(f"{prefix}/filler/{i}".encode(), b"x")
                return resp.header.revision

        pushed = asyncio.run(push())
        Mesh.wait_for(
            lambda: not asyncio.run(_readable_at(etcd.endpoint, f"{prefix}/x", pushed - 1)),
            10,
            "the leader's key to fall behind the compaction",
        )
        b.start(leader=False)
        time.sleep(1.5)
        log = (tmp_path / "b.log").read_text()
        assert "cannot campaign" not in log and log.count("standing by") == 1, log
        assert health(b.address, "tether.v1.ControllerService") != 1  # not SERVING
        a.kill()
        Mesh.wait_for(
            lambda: health(b.address, "tether.v1.ControllerService") == 1, 15, "b to lead"
        )
    finally:
        a.stop()
        b.stop()
