"""Scheduling in narrow windows (found by a review): a run reload, a gang replica done before
its node is lost, a drain deadline passed while no agent listened, a long low-priority backlog."""

from __future__ import annotations

import asyncio
import threading
import time

from helpers import PY, Mesh, S, wait_for

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import free_port
from tether.sdk import Workflow

SLEEP = "import time; time.sleep({})"


def _task(run, name):
    return next(tk for tk in run.status().tasks if tk.spec.name == name)


def test_a_run_reload_does_not_give_a_running_attempts_gpu_to_another_task(mesh):
    """A run reloaded after a write conflict is dropped from the cache (its attempts' CPU,
    memory and GPUs released) and read again from etcd; meanwhile its attempts still run on
    their nodes. A pass during the reload must not place another task on what they hold."""
    mesh.add_agent("n1", cpu=4, fake_gpus="1")
    engine = mesh.controller.engine
    store = mesh.controller.store

    real_txn = store.txn
    fired = []

    def cancels_c(ops):
        for op in ops:
            if "/tasks/" in op.key and op.key.endswith("/c"):
                if t.TaskRun.FromString(op.value).cancel_requested:
                    return True
        return False

    async def txn(compares, ops, failure=(), fenced=True):
        res = await real_txn(compares, ops, failure, fenced)
        if not fired and res[0] and cancels_c(ops):
            fired.append(True)
            raise TimeoutError("simulated: reply lost after the txn committed")
        return res

    store.txn = txn
    real_get = store.get

    get_failed = []

    async def slow_get(key):
        if fired and not get_failed and "/tasks/" in key:
            # etcd still away when the committer checks whether the write went through: it
            # writes again, loses the compare (it had committed) and reloads the run.
            get_failed.append(True)
            raise TimeoutError("simulated: etcd still away")
        if "/runs/" in key and fired:  # the reload's read of the run takes a while
            await asyncio.sleep(3.0)
        return await real_get(key)

    store.get = slow_get

    wf = Workflow("holder")
    wf.task("a", [PY, "-c", SLEEP.format(60)], gpu=1, cpu=1)
    wf.task("c", [PY, "-c", SLEEP.format(60)], cpu=0.5)
    client = mesh.client()
    r1 = client.submit(wf)
    mesh.wait_for(
        lambda: all(tk.state == S.TASK_STATE_RUNNING for tk in r1.status().tasks), 10, "running"
    )
    assert list(_task(r1, "a").attempts[-1].gpu_indices) == [0]

    def cancel_c():  # its write conflicts on the retry: the run reloads
        try:
            mesh.client().cancel(r1.id, task="c")
        except Exception:
            pass  # the reply may say the cancel is not known to be in etcd

    threading.Thread(target=cancel_c, daemon=True).start()
    mesh.wait_for(lambda: r1.id in engine._cache.reloading, 10, "the run reloading")

    wf2 = Workflow("wants-the-gpu")
    wf2.task("b", [PY, "-c", SLEEP.format(30)], gpu=1, cpu=1)
    r2 = client.submit(wf2)
    mesh.wait_for(lambda: r1.id not in engine._cache.reloading, 10, "the reload over")
    time.sleep(0.5)
    b = _task(r2, "b")
    a = _task(r1, "a")
    assert a.state == S.TASK_STATE_RUNNING
    # a still holds GPU 0 on n1 (the only GPU): b must wait for it.
    assert b.state == S.TASK_STATE_READY, (
        f"b is {S.Name(b.state)} on {b.node} with GPUs {list(b.attempts[-1].gpu_indices)} "
        f"while a runs there with GPUs {list(a.attempts[-1].gpu_indices)}"
    )
    client.cancel(r1.id)
    client.cancel(r2.id)


GANG_ONE_QUICK = "import os, time\nif os.environ['TETHER_REPLICA_INDEX'] == '0': time.sleep(8)\n"


def test_a_node_lost_after_its_gang_replica_succeeded_does_not_lose_the_gang(mesh):
    """Replica 1 of a gang succeeds while replica 0 still runs; then replica 1's node goes
    away (its agent stops, its lease expires). The node holds nothing of the gang any more,
    as registration already knows (Nodes._reconcile_agent skips a finished replica): the
    gang must finish, not be lost and retried whole (here: waiting forever for 2 nodes)."""
    mesh.add_agent("n1", max_tasks=1)
    mesh.add_agent("n2", max_tasks=1)
    wf = Workflow("gang-node-gone")
    wf.task("train", [PY, "-c", GANG_ONE_QUICK], replicas=2)
    client = mesh.client()
    run = client.submit(wf)

    def replica1_done():
        tk = run.status().tasks[0]
        return len(tk.replicas) == 2 and tk.replicas[1].state == S.TASK_STATE_SUCCEEDED

    mesh.wait_for(replica1_done, 10, "replica 1 succeeded")
    tk = run.status().tasks[0]
    assert tk.state == S.TASK_STATE_RUNNING and tk.attempt == 1
    mesh.stop_agent(tk.replicas[1].node)  # its lease expires 2 s later
    time.sleep(4)
    tk = run.status().tasks[0]
    assert tk.attempt == 1 and tk.state == S.TASK_STATE_RUNNING, (
        f"{S.Name(tk.state)} attempt {tk.attempt}: {tk.message} {tk.waiting_reason}"
    )
    final = run.wait(timeout=20)
    task = final.tasks[0]
    assert task.state == S.TASK_STATE_SUCCEEDED, (
        f"{S.Name(task.state)} attempt {task.attempt}: {task.message or task.waiting_reason}"
    )
    assert task.attempt == 1


def test_a_drain_whose_deadline_passed_during_a_failover_still_stops_what_runs(
    etcd, prefix, tmp_path
):
    """A drain's deadline that passes while no controller leads fires at the next leader's
    takeover, before the node's agent has registered with it: nothing is stopped then, and
    nothing tries again once the agent is back. README: at the deadline "what still runs
    then is stopped and retried elsewhere"."""
    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        # A grace long enough that the agent does not fence itself while no controller leads.
        mesh.add_agent("n1", disconnect_grace=30.0)
        mesh.add_agent("n2", disconnect_grace=30.0)
        client = mesh.client()
        client.cordon_node("n2")  # so that the work starts on n1
        code = "import os,time; time.sleep(40 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"
        wf = Workflow("drained-over-failover")
        wf.task("long", [PY, "-c", code])
        run = client.submit(wf)
        wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
        client.uncordon_node("n2")
        client.drain_node("n1", deadline=1.0)
        mesh.stop_controller()
        time.sleep(2.0)  # the deadline passes while no controller leads
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        client = mesh.client()
        wait_for(lambda: len(client.nodes()) == 2, 20, "nodes back")
        final = client.get_run(run.id)
        deadline = time.monotonic() + 10
        while final.state != t.RunState.RUN_STATE_SUCCEEDED and time.monotonic() < deadline:
            time.sleep(0.2)
            final = client.get_run(run.id)
        task = final.tasks[0]
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED, (
            f"{S.Name(task.state)} on {task.node}, attempt {task.attempt}: still running on the "
            "drained node past its deadline"
        )
        assert task.node == "n2" and task.attempts[0].state == S.TASK_STATE_LOST
    finally:
        mesh.close()


def test_a_default_priority_task_preempts_a_long_low_priority_preemptible_backlog(mesh):
    """README: "Ready tasks go highest priority first" and a task that fits nowhere may stop
    preemptible attempts of strictly lower priority. With more backfill tasks (priority 10,
    preemptible) waiting than a pass's window holds (64 when slots are full), a task of the
    default priority 50 behind them is never planned: it neither preempts nor goes first,
    and waits for the whole backlog (aging cannot help: it is never in a window)."""
    mesh.add_agent("solo", cpu=8, max_tasks=1)
    client = mesh.client()
    backfill = Workflow("backfill")
    for i in range(70):
        backfill.task(f"b{i}", [PY, "-c", SLEEP.format(60)], cpu=0.1, priority=10, preemptible=True)
    low = client.submit(backfill)
    mesh.wait_for(
        lambda: any(tk.state == S.TASK_STATE_RUNNING for tk in low.status().tasks),
        10,
        "backfill under way",
    )
    normal = Workflow("normal")
    normal.task("job", [PY, "-c", "pass"], cpu=0.1)  # priority 50, the default
    run = client.submit(normal)
    try:
        done = run.wait(timeout=10)
        assert done.tasks[0].state == S.TASK_STATE_SUCCEEDED
    finally:
        client.cancel(low.id)


def test_a_stale_attempt_of_a_node_that_came_back_keeps_its_gpu_until_it_ends(
    etcd, prefix, tmp_path
):
    """A node cut off for longer than the lease is lost (its attempt LOST, its GPU freed in
    the books), but its agent, with a longer grace, still runs the attempt. When the agent
    comes back, the controller has it stopped as stale; until it has ended, its GPU must
    not go to another task."""
    import json

    from helpers import TcpProxy

    log = tmp_path / "gpu.jsonl"
    # Takes its time over SIGTERM (a checkpoint, say), then records its end.
    holder = (
        "import json,os,signal,sys,time\n"
        f"log={str(log)!r}\n"
        "def note(**kw):\n"
        "    open(log,'a').write(json.dumps({'task': 'a', **kw, 'at': time.time()})+'\\n')\n"
        "def term(*_):\n"
        "    time.sleep(1.0); note(event='end'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "note(event='start', attempt=int(os.environ['TETHER_ATTEMPT']))\n"
        "time.sleep(60)\n"
    )
    taker = (
        f"import json,time; open({str(log)!r},'a').write("
        "json.dumps({'task': 'b', 'event': 'start', 'at': time.time()})+'\\n')"
    )

    def events():
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=2)
    mesh.start_controller()
    proxy = TcpProxy(mesh.address)
    try:
        mesh.add_agent("n1", controller=proxy.address, disconnect_grace=15.0, fake_gpus="1")
        client = mesh.client()
        first = Workflow("holder")
        first.task("a", [PY, "-c", holder], gpu=1, retries=2)
        run_a = client.submit(first)
        wait_for(lambda: any(e["event"] == "start" for e in events()), 20, "a started")
        proxy.pause()
        wait_for(
            lambda: _task(run_a, "a").state in (S.TASK_STATE_LOST, S.TASK_STATE_RETRYING),
            15,
            "a lost with its node",
        )
        second = Workflow("taker")
        second.task("b", [PY, "-c", taker], gpu=1)
        run_b = client.submit(second)
        time.sleep(0.5)
        proxy.resume()  # n1 is back, still running a's attempt 1, now stale
        run_b.wait(timeout=30)
        ended = [e["at"] for e in events() if e["task"] == "a" and e["event"] == "end"]
        b_start = [e["at"] for e in events() if e["task"] == "b"]
        assert ended and b_start, events()
        assert b_start[0] >= ended[0], (
            f"b started on the GPU {ended[0] - b_start[0]:.2f}s before a's stale attempt ended"
        )
    finally:
        mesh.close()
        proxy.close()
