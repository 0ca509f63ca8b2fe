"""Narrow failure windows (found by a review): a reload meeting an etcd error, a lost
attempt's hold across a restart, a deposed engine's acknowledgements, a cancel's durability,
a pending preemption ending with a lost attempt, an agent's long grace across a failover."""

from __future__ import annotations

import time

import pytest
from helpers import PY, R, S

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow


def _task_write(name, state):
    def pred(ops):
        for op in ops:
            if "/tasks/" in op.key and op.key.endswith("/" + name) and op.value:
                if t.TaskRun.FromString(op.value).state == state:
                    return True
        return False

    return pred


def test_run_reload_that_meets_an_etcd_error_is_not_dropped(mesh):
    """A write whose reply is lost while etcd is briefly unreachable: the committer cannot
    tell whether it committed, retries, loses the compare (it had committed) and reloads the
    run. The reload's read fails too (etcd still away): the run must not vanish from the
    controller's memory, or it stalls until the next failover (its next task is never
    scheduled, its reports are acknowledged unrecorded)."""
    mesh.add_agent("n1")
    store = mesh.controller.store
    real_txn, real_get = store.txn, store.get
    fired: list[float] = []

    async def txn(compares, ops, failure=(), fenced=True):
        res = await real_txn(compares, ops, failure, fenced)
        if not fired and res[0] and _task_write("a", S.TASK_STATE_SUCCEEDED)(ops):
            fired.append(time.monotonic())
            raise TimeoutError("simulated: reply lost after the txn committed")
        return res

    async def get(key):  # reads of records time out for a second (the leader key answers)
        if fired and key != store.keys.leader and time.monotonic() - fired[0] < 1.0:
            raise TimeoutError("simulated: etcd unreachable for a second")
        return await real_get(key)

    store.txn, store.get = txn, get
    wf = Workflow("reload-error")
    a = wf.task("a", [PY, "-c", "pass"])
    wf.task("b", [PY, "-c", "pass"], depends_on=[a])
    run = mesh.client().submit(wf)
    final = run.wait(timeout=15)
    assert fired
    assert final.state == R.RUN_STATE_SUCCEEDED


@pytest.mark.parametrize("lost_first", [True, False], ids=["lost-then-restart", "restart-first"])
def test_a_cut_off_agents_long_grace_holds_its_attempt_across_a_restart(
    etcd, prefix, tmp_path, lost_first
):
    """An agent with a disconnect grace (5 s) longer than the lease (2 s) is cut off while it
    runs an attempt; the controller restarts. The attempt's copy must wait until the grace
    has passed since the last contact (the agent runs it until then), not start at once
    next to the still-running original:

    - lost-then-restart: the node is lost at the TTL, then the controller restarts during
      the hold; the new leader keeps it (the LOST record's not_before);
    - restart-first: the controller restarts before the node is lost; the new leader, which
      never saw the agent register, still knows its grace (kept in etcd at registration).
    """
    from helpers import Mesh, TcpProxy, wait_for
    from test_fencing import recorder, records

    from tether.agent.runtimes.reaper import alive, start_ticks
    from tether.controller.etcd_process import free_port

    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    mesh.start_controller(listen=f"127.0.0.1:{port}")
    proxy = TcpProxy(mesh.address)
    try:
        mesh.add_agent("n1", controller=proxy.address, disconnect_grace=5.0)
        log = tmp_path / "attempts.jsonl"
        client = mesh.client()
        run = client.submit(recorder(log, 30))
        wait_for(lambda: records(log), 20, "attempt 1 started")
        first = records(log)[0]
        ticks = start_ticks(first["pid"])
        mesh.add_agent("n2")
        proxy.pause()
        if lost_first:
            wait_for(
                lambda: client.get_run(run.id).tasks[0].state == S.TASK_STATE_LOST,
                10,
                "the attempt lost with its node",
            )
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        died = None
        deadline = time.monotonic() + 25
        while died is None and time.monotonic() < deadline and len(records(log)) < 2:
            if not alive(first["pid"], ticks):
                died = time.time()
            time.sleep(0.005)
        wait_for(lambda: len(records(log)) >= 2, 25, "attempt 2")
        second = records(log)[1]
        still = died is None and alive(first["pid"], ticks)
        assert died is not None and died <= second["start"], (
            f"attempt 2 started {second['start'] - first['start']:.1f}s after attempt 1, "
            f"which still ran on the cut-off node (alive now: {still})"
        )
    finally:
        mesh.close()
        proxy.close()


def test_a_deposed_engine_does_not_acknowledge_a_result_it_never_wrote(mesh, tmp_path):
    """The leader loses its key just as it writes a task's result: the write is refused
    (NotLeader) and dropped. While the deposed engine is still stopping (etcd slow: its
    learned-durations write hangs for a moment), the agent resends the report before its
    next heartbeat. The old engine must not acknowledge it (the result is in no etcd
    record): the agent would forget it, and the next term, finding the task RUNNING and the
    agent without it, runs it again — "a finished task never runs again"."""
    import asyncio

    from helpers import wait_for
    from test_fencing import recorder, records

    from tether.controller.store import Delete

    n1 = mesh.add_agent("n1")
    store = mesh.controller.store
    real_txn = store.txn
    fired: list[bool] = []

    async def txn(compares, ops, failure=(), fenced=True):
        if not fired and fenced and _task_write("work", S.TASK_STATE_SUCCEEDED)(ops):
            fired.append(True)
            # Someone else takes the leadership (an operator's recovery deletes the key).
            await real_txn([], [Delete(store.keys.leader)], fenced=False)
        if fired and any("/durations/" in op.key for op in ops):
            await asyncio.sleep(1.5)  # etcd slow: the deposed engine takes a while to stop
        return await real_txn(compares, ops, failure, fenced)

    store.txn = txn
    log = tmp_path / "attempts.jsonl"
    run = mesh.client().submit(recorder(log, 0.5))
    final = run.wait(timeout=30)
    assert fired
    wait_for(lambda: not n1.runner.pending_reports(), 10, "report acknowledged")
    starts = [r["attempt"] for r in records(log) if "start" in r]
    assert final.state == R.RUN_STATE_SUCCEEDED
    assert starts == [1], f"the task ran {len(starts)} times: attempts {starts}"


def test_a_cancel_is_answered_only_once_it_survives_a_controller_restart(etcd, prefix, tmp_path):
    """CancelRun used to answer OK before the cancel was in etcd: the cancel was only marked
    for the committer. If the controller went away before that write landed (etcd slow,
    then a crash or a restart), the user had been told the run was cancelled but the next
    leader resumed it. Now it answers once written: while the write hangs, the caller gets
    an error (and may ask again); once it lands, the cancel holds across a restart."""
    import asyncio

    from helpers import Mesh

    from tether.controller.etcd_process import free_port
    from tether.sdk.errors import TetherError

    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    mesh.start_controller(listen=f"127.0.0.1:{port}")
    try:
        client = mesh.client()
        wf = Workflow("cancel-durable")
        wf.task("big", [PY, "-c", "pass"], cpu=64)  # no node can take it: it waits READY
        run = client.submit(wf)
        store = mesh.controller.store
        real_txn = store.txn

        async def txn(compares, ops, failure=(), fenced=True):
            for op in ops:
                if op.key == store.keys.run(run.id) and t.Run.FromString(op.value).cancel_requested:
                    await asyncio.sleep(30)  # etcd slow: the write has not landed yet
            return await real_txn(compares, ops, failure, fenced)

        store.txn = txn
        client.timeout = 2.0  # the call's deadline, well before the write lands
        try:
            client.cancel(run.id)
            answered = True
        except TetherError:
            answered = False
        assert not answered, "CancelRun answered OK while its write had not landed"
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        client = mesh.client()
        assert client.get_run(run.id).state == R.RUN_STATE_PENDING  # the cancel was lost...
        client.cancel(run.id)  # ...and asked again, answered once written
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        state = mesh.client().get_run(run.id).state
        assert state == R.RUN_STATE_CANCELLED, (
            f"run is {R.Name(state)} after an acknowledged cancel"
        )
    finally:
        mesh.close()


def test_a_victim_lost_before_its_preemption_lands_counts_its_next_failure(etcd, prefix, tmp_path):
    """A preemptible task is chosen as a victim (``preempted_by`` written) but its node is
    lost before it reports: the attempt ends LOST and ``preempted_by`` stays on the task.
    Its next attempt, on another node, fails on its own (exit 1, ``retries`` 0): that failure
    must count. With the stale ``preempted_by`` it is taken for a preemption instead, and the
    task is retried free of charge for ever."""
    from helpers import Mesh, TcpProxy, py

    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    mesh.start_controller()
    proxy = TcpProxy(mesh.address)
    try:
        mesh.add_agent("n1", cpu=1, controller=proxy.address)
        client = mesh.client()
        low = Workflow("low")
        low.task(
            "batch",
            py(
                "import os, sys, time; time.sleep(60) if os.environ['TETHER_ATTEMPT'] == '1' "
                "else sys.exit(1)"
            ),
            cpu=1,
            priority=10,
            preemptible=True,
        )
        low_run = client.submit(low)
        mesh.wait_for(
            lambda: low_run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "low running"
        )
        proxy.pause()  # n1 is cut off: the preemption's cancel never reaches it
        high = Workflow("high")
        high.task("urgent", py("pass"), cpu=1, priority=90)
        high_run = client.submit(high)
        mesh.wait_for(lambda: low_run.status().tasks[0].preempted_by, 10, "victim chosen")
        mesh.wait_for(
            lambda: low_run.status().tasks[0].attempts[0].state == S.TASK_STATE_LOST,
            10,
            "victim lost with its node",
        )
        mesh.add_agent("n2", cpu=1)
        assert high_run.wait(timeout=20).state == R.RUN_STATE_SUCCEEDED
        done = low_run.wait(timeout=20)
        batch = done.tasks[0]
        states = [S.Name(a.state) for a in batch.attempts]
        assert done.state == R.RUN_STATE_FAILED, f"attempts: {states}"
        assert batch.attempt == 2, f"attempts: {states}"
    finally:
        mesh.close()
        proxy.close()
