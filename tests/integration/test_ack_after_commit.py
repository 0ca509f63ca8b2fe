"""A final report is acknowledged only once its result is in etcd, even when resent."""

from __future__ import annotations

import asyncio
import time

from helpers import PY, S

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow


def test_resent_report_is_not_acked_before_its_result_is_in_etcd(mesh):
    mesh.add_agent("n1")
    store = mesh.controller.store
    real = store.txn
    slow = []

    async def txn(compares, ops, failure=(), fenced=True):
        for op in ops:
            if (
                "/tasks/" in op.key
                and t.TaskRun.FromString(op.value).state == S.TASK_STATE_SUCCEEDED
            ):
                slow.append(True)
                await asyncio.sleep(3)  # etcd is slow to commit this one
        return await real(compares, ops, failure, fenced)

    store.txn = txn
    wf = Workflow("ack")
    wf.task("a", [PY, "-c", "pass"])
    client = mesh.client()
    run = client.submit(wf)
    agent = mesh.agents["n1"][0]
    mesh.wait_for(lambda: slow, 10, "the result's write started")
    time.sleep(1.5)  # two heartbeats (lease_ttl 2 -> every ~0.67 s) resend the report
    # Read etcd itself, not the engine's cache.
    kv = mesh.call(store.get(store.keys.task(run.id, "a")))
    in_etcd = S.Name(t.TaskRun.FromString(kv.value).state)
    assert in_etcd != "TASK_STATE_RUNNING" or agent.runner.unacked, "acked before commit"
