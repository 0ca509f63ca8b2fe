"""A large submit that died before its commit and that nobody retried is deleted from etcd
after ``pending_submit_ttl``; a submit still writing when that happens writes nothing more.

As in ``test_large_submit``, the controller writes in small transactions and the failure is
injected in its submit path; etcd is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from helpers import Mesh, wait_for
from test_large_submit import TXN_BYTES, break_after, keys_under

from tether.controller.abandoned_submits import created_at
from tether.controller.errors import FailedPrecondition
from tether.controller.records import new_run_id
from tether.sdk import TetherError, Workflow
from tether.sdk.errors import UnavailableError

WIDTH = 2999


@pytest.fixture
def big_mesh(etcd, prefix, tmp_path):
    m = Mesh(
        etcd.endpoint, prefix, tmp_path / "agents", submit_txn_bytes=TXN_BYTES, pending_submit_ttl=0
    )
    m.start_controller()
    yield m
    m.close()


def fan_in(width: int) -> Workflow:
    """``width`` tasks and two joins: one on the first 300 (its long ``depends_on`` is among
    the first keys written), one on all."""
    wf = Workflow("fan-in")
    names = [wf.task(f"t{i}", ["true"]).name for i in range(300)]
    wf.task("early-join", ["true"], depends_on=names)
    names += [wf.task(f"t{i}", ["true"]).name for i in range(300, width)]
    wf.task("join", ["true"], depends_on=names)
    return wf


def before_each_chunk(mesh: Mesh, hook) -> Callable:
    """Have the controller ``await hook(n, resumed)`` before it writes its n-th chunk (from
    1); return the write it had, to put back."""
    submitter = mesh.controller.engine._submitter
    real = submitter._write_chunk
    count = 0
    in_flight = 0

    async def write_chunk(chunk, resumed, pending):
        nonlocal count, in_flight
        count += 1
        try:
            await hook(count, resumed)
        except Exception:
            # Raised once the chunks before it are written: the failure cancels those still
            # in flight, and which of them reached etcd would be left to chance.
            while in_flight:
                await asyncio.sleep(0.005)
            raise
        in_flight += 1
        try:
            return await real(chunk, resumed, pending)
        finally:
            in_flight -= 1

    submitter._write_chunk = write_chunk
    return real


def fail_after(mesh: Mesh, chunks: int) -> None:
    """Make the controller's chunk writes fail after ``chunks`` of them with an error the
    client does not retry (its retries would take the submit up again, and age it)."""

    async def hook(n: int, resumed: bool) -> None:
        if n > chunks:
            raise FailedPrecondition("injected")

    before_each_chunk(mesh, hook)


def leftovers(mesh: Mesh, etcd, run_id: str) -> dict[str, int]:
    """How many keys of ``run_id``'s submit are in etcd, by kind."""
    keys = mesh.controller.store.keys
    return {
        "requests": len(keys_under(etcd.endpoint, keys.requests)),
        "tasks": len(keys_under(etcd.endpoint, keys.tasks_of(run_id))),
        "deps": len(keys_under(etcd.endpoint, keys.deps_of(run_id))),
    }


def pending_run_id(mesh: Mesh, etcd) -> str:
    (marker,) = keys_under(etcd.endpoint, mesh.controller.store.keys.requests).values()
    run_id, _, rest = marker.decode().partition(" ")
    assert rest.endswith(" pending")
    return run_id


def test_an_abandoned_submit_is_deleted_and_its_retry_starts_afresh(big_mesh, etcd):
    mesh = big_mesh
    client = mesh.client()
    wf = fan_in(WIDTH)
    healed = break_after(mesh, 10)
    with pytest.raises(UnavailableError):
        client.submit(wf, request_id="given-up")
    run_id = pending_run_id(mesh, etcd)
    before = leftovers(mesh, etcd, run_id)
    assert before["requests"] == 1 and before["tasks"] > 0 and before["deps"] > 0

    # Younger than the ttl: kept for a retry.
    assert mesh.call(mesh.controller.engine.collect_abandoned_submits(3600)) == 0
    assert leftovers(mesh, etcd, run_id) == before

    assert mesh.call(mesh.controller.engine.collect_abandoned_submits(0)) == 1
    assert leftovers(mesh, etcd, run_id) == {"requests": 0, "tasks": 0, "deps": 0}

    # A late retry is a new submit: a new run, whole.
    healed.set()
    run = client.submit(wf, request_id="given-up")
    assert run.id != run_id and not run.existing
    assert len(client.get_run(run.id).tasks) == WIDTH + 2
    assert len(keys_under(etcd.endpoint, mesh.controller.store.keys.tasks_of(run.id))) == WIDTH + 2
    # A committed submit's request key is not pending: never taken for abandoned.
    assert mesh.call(mesh.controller.engine.collect_abandoned_submits(0)) == 0
    assert client.submit(wf, request_id="given-up").id == run.id


def test_the_controller_deletes_abandoned_submits_by_itself(etcd, prefix, tmp_path):
    mesh = Mesh(
        etcd.endpoint,
        prefix,
        tmp_path / "agents",
        submit_txn_bytes=TXN_BYTES,
        pending_submit_ttl=1.0,
    )
    try:
        mesh.start_controller()
        fail_after(mesh, 5)
        with pytest.raises(TetherError):
            mesh.client().submit(fan_in(WIDTH), request_id="forgotten")
        run_id = pending_run_id(mesh, etcd)
        assert leftovers(mesh, etcd, run_id)["tasks"] > 0
        wait_for(
            lambda: leftovers(mesh, etcd, run_id) == {"requests": 0, "tasks": 0, "deps": 0},
            10,
            "the abandoned submit deleted",
        )
    finally:
        mesh.close()


def test_a_submit_deleted_while_it_writes_leaves_nothing_behind(big_mesh, etcd):
    mesh = big_mesh

    async def hook(n: int, resumed: bool) -> None:
        if n == 6:  # this submit is taken for abandoned half-way through its writes
            assert await mesh.controller.engine.collect_abandoned_submits(0) == 1

    real = before_each_chunk(mesh, hook)
    client = mesh.client()
    with pytest.raises(TetherError) as caught:
        client.submit(fan_in(WIDTH), request_id="slow")
    # The chunks written after the deletion failed; those before it went with the rest.
    keys = mesh.controller.store.keys
    assert keys_under(etcd.endpoint, keys.requests) == {}
    assert keys_under(etcd.endpoint, keys.tasks) == {}
    assert keys_under(etcd.endpoint, keys.deps) == {}
    assert keys_under(etcd.endpoint, keys.runs) == {}
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert "pending_submit_ttl" in str(caught.value)

    mesh.controller.engine._submitter._write_chunk = real
    run = client.submit(fan_in(WIDTH), request_id="slow")
    assert len(client.get_run(run.id).tasks) == WIDTH + 2


def test_a_retry_deleted_while_it_finishes_the_submit_leaves_nothing_behind(big_mesh, etcd):
    mesh = big_mesh
    client = mesh.client()
    healed = break_after(mesh, 10)
    with pytest.raises(UnavailableError):
        client.submit(fan_in(WIDTH), request_id="resumed")
    run_id = pending_run_id(mesh, etcd)
    healed.set()

    async def hook(n: int, resumed: bool) -> None:
        # The retry's 14th chunk: past what the first try wrote (10 chunks and a few in
        # flight), so the retry is creating keys again.
        if n == 14:
            assert resumed
            assert await mesh.controller.engine.collect_abandoned_submits(0) == 1

    before_each_chunk(mesh, hook)
    with pytest.raises(TetherError) as caught:
        client.submit(fan_in(WIDTH), request_id="resumed")
    assert leftovers(mesh, etcd, run_id) == {"requests": 0, "tasks": 0, "deps": 0}
    assert keys_under(etcd.endpoint, mesh.controller.store.keys.runs) == {}
    assert caught.value.code == grpc.StatusCode.ABORTED


def test_run_ids_tell_their_creation_time():
    import time

    assert abs(created_at(new_run_id()) - time.time()) < 5
    assert created_at("not-hex-at-all") is None
