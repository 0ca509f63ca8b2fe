"""A run-only wait must end when the run's final write is learned through a reload.

The run's final record commits but the reply is lost, and etcd cannot be read right after
(so the committer cannot tell it committed). The committer writes it again, loses the
compare (etcd holds the first write), and the engine reloads the run from etcd: it is
finished there, so it is not cached again and no write of it goes through on_written. The
reload tells the RunWatch waiters what it read, so RunHandle.wait ends with the run.
"""

from __future__ import annotations

from helpers import PY, R

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.sdk import Workflow


def test_wait_ends_when_the_final_run_write_is_learned_by_a_reload(mesh):
    mesh.add_agent("n1")
    store = mesh.controller.store
    real_txn, real_get = store.txn, store.get
    fired: list[bool] = []
    failing_gets: list[int] = [0]

    def final_run_write(ops) -> bool:
        for op in ops:
            if op.key.startswith(store.keys.runs) and getattr(op, "value", None):
                if t.Run.FromString(op.value).state in lc.RUN_TERMINAL:
                    return True
        return False

    async def txn(compares, ops, *args, **kw):
        res = await real_txn(compares, ops, *args, **kw)
        if not fired and res[0] and final_run_write(ops):
            fired.append(True)
            failing_gets[0] = len(ops)  # the committer's checks of what it wrote fail too
            raise TimeoutError("simulated: reply lost after the txn committed")
        return res

    async def get(key, *args, **kw):
        if failing_gets[0] > 0:
            failing_gets[0] -= 1
            raise TimeoutError("simulated: etcd unreachable for a moment")
        return await real_get(key, *args, **kw)

    store.txn, store.get = txn, get
    wf = Workflow("reload-wait")
    wf.task("a", [PY, "-c", "import time; time.sleep(1.0)"])
    run = mesh.client().submit(wf)
    final = run.wait(timeout=15)  # registered on the cached run long before it ends
    assert fired
    assert final.state == R.RUN_STATE_SUCCEEDED
