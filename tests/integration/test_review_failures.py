"""Failure-handling bugs found by a review; each test fails on the code it was written against."""

from __future__ import annotations

import time

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
