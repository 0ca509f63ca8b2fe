"""etcd transactions that commit but whose reply is lost: nothing stalls, nothing runs twice."""

from __future__ import annotations

from helpers import PY, R, S

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow


def _inject_timeout_after_commit(mesh, pred):
    store = mesh.controller.store
    real = store.txn
    fired = []

    async def txn(compares, ops, failure=(), fenced=True):
        res = await real(compares, ops, failure, fenced)
        if not fired and res[0] and pred(ops):
            fired.append(True)
            raise TimeoutError("simulated: reply lost after the txn committed")
        return res

    store.txn = txn
    return fired


def _has_scheduled(name):
    def pred(ops):
        for op in ops:
            if "/tasks/" in op.key and op.key.endswith("/" + name):
                m = t.TaskRun.FromString(op.value)
                if m.state == S.TASK_STATE_SCHEDULED:
                    return True
        return False

    return pred


def test_bind_whose_commit_reply_times_out_still_runs(mesh):
    mesh.add_agent("n1")
    fired = _inject_timeout_after_commit(mesh, _has_scheduled("b"))
    wf = Workflow("tmo")
    a = wf.task("a", [PY, "-c", "pass"])
    wf.task("b", [PY, "-c", "pass"], depends_on=[a])
    run = mesh.client().submit(wf)
    final = run.wait(timeout=15)
    assert fired
    assert final.state == R.RUN_STATE_SUCCEEDED


def test_report_arriving_while_a_run_reloads_is_not_lost(mesh):
    import asyncio

    mesh.add_agent("n1")
    store = mesh.controller.store

    def cancels_c(ops):
        for op in ops:
            if op.key.endswith("/c") and "/tasks/" in op.key:
                if t.TaskRun.FromString(op.value).cancel_requested:
                    return True
        return False

    fired = _inject_timeout_after_commit(mesh, cancels_c)
    real_get = store.get

    async def slow_get(key):  # a slow etcd: the reload's read takes a while
        if "/runs/" in key and fired:
            await asyncio.sleep(2.0)
        return await real_get(key)

    store.get = slow_get
    wf = Workflow("reload")
    wf.task("a", [PY, "-c", "import time; time.sleep(1.5)"])
    wf.task("c", [PY, "-c", "import time; time.sleep(60)"])
    client = mesh.client()
    run = client.submit(wf)
    mesh.wait_for(
        lambda: all(tk.state == S.TASK_STATE_RUNNING for tk in run.status().tasks), 10, "running"
    )
    client.cancel(run.id, task="c")
    final = run.wait(timeout=20)
    assert fired
    assert final.state == R.RUN_STATE_FAILED  # c cancelled, a succeeded


def test_submit_whose_commit_reply_times_out_is_scheduled_after_retry(mesh):
    mesh.add_agent("n1")
    store = mesh.controller.store
    real = store.txn_get
    fired = []

    async def txn_get(compares, ops, key):
        res = await real(compares, ops, key)
        if not fired:
            fired.append(True)
            raise TimeoutError("simulated: reply lost after the submit committed")
        return res

    store.txn_get = txn_get
    wf = Workflow("sub")
    wf.task("a", [PY, "-c", "pass"])
    client = mesh.client()
    run = client.submit(wf)  # gRPC's retry policy resends it with the same request id
    st = run.wait(timeout=10)
    assert run.existing  # the retry found the first submit's run
    assert st.state == R.RUN_STATE_SUCCEEDED


def test_a_submit_whose_reply_is_lost_is_taken_up_without_a_retry(mesh):
    """The submit transaction commits (the first task bound in it) but its reply is lost, and
    the caller never retries: the controller still takes the run up and runs it."""
    mesh.add_agent("n1")
    engine = mesh.controller.engine
    store = mesh.controller.store
    real = store.txn_get
    fired = []

    async def txn_get(compares, ops, key):
        res = await real(compares, ops, key)
        if not fired and res[0]:
            fired.append(True)
            raise TimeoutError("simulated: reply lost after the submit committed")
        return res

    store.txn_get = txn_get
    wf = Workflow("lost-submit")
    wf.task("a", [PY, "-c", "pass"])
    spec = wf.to_proto()

    async def submit():
        try:
            await engine.submit(spec, {}, "req-lost-1", "")
        except TimeoutError:
            return "lost"
        return "answered"

    assert mesh.call(submit()) == "lost" and fired
    client = mesh.client()
    mesh.wait_for(lambda: any(True for _ in client.list_runs()), 10, "the run exists")
    (run,) = list(client.list_runs())
    mesh.wait_for(
        lambda: client.get_run(run.id).state == R.RUN_STATE_SUCCEEDED, 15, "the run finished"
    )


def test_a_lost_submit_is_taken_up_however_long_etcd_stays_away(mesh, monkeypatch, tmp_path):
    """As above, and etcd does not answer the controller's reads of the run for a while
    (more tries than the controller used to make before giving up on it): the run is
    still taken up once it does, with no client asking for it."""
    from tether.controller import submit as submit_module

    monkeypatch.setattr(submit_module, "ADOPT_RETRY_FIRST", 0.01)
    monkeypatch.setattr(submit_module, "ADOPT_RETRY_MOST", 0.05)
    mesh.add_agent("n1")
    engine = mesh.controller.engine
    store = mesh.controller.store
    real_txn_get, real_get = store.txn_get, store.get
    fired, failed_reads = [], []

    async def txn_get(compares, ops, key):
        res = await real_txn_get(compares, ops, key)
        if not fired and res[0]:
            fired.append(True)
            raise TimeoutError("simulated: reply lost after the submit committed")
        return res

    async def get(key):
        if fired and "/runs/" in key and len(failed_reads) < 12:
            failed_reads.append(key)
            raise TimeoutError("simulated: etcd unreachable")
        return await real_get(key)

    store.txn_get, store.get = txn_get, get
    done = tmp_path / "ran"
    wf = Workflow("lost-submit-long")
    wf.task("a", [PY, "-c", f"open({str(done)!r}, 'w').close()"])

    async def submit():
        try:
            await engine.submit(wf.to_proto(), {}, "req-lost-2", "")
        except TimeoutError:
            return "lost"
        return "answered"

    assert mesh.call(submit()) == "lost"
    # Nothing here reads the run through the API (that would take it up itself).
    mesh.wait_for(done.exists, 20, "the lost submit's task ran")
    assert len(failed_reads) == 12
