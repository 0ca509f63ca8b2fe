"""The final report of an attempt adopted by a restarted agent has its secret masked, like
any other attempt's (README "Secrets": the log tails an attempt reports have the value
replaced by ``[secret]``), and etcd never holds the value in plaintext."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

from etcd3aio import Etcd3Client, prefix_range_end
from helpers import Mesh, by_name, py

from tether.api.v1 import types_pb2 as t
from tether.sdk import Secret, Workflow


def _etcd_values(endpoint: str, prefix: str) -> list[bytes]:
    async def dump():
        async with Etcd3Client([endpoint]) as c:
            resp = await c.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
            return [kv.key + kv.value for kv in resp.kvs]

    return asyncio.run(dump())


def test_secret_masked_in_report_of_attempt_adopted_after_agent_restart(etcd, prefix, tmp_path):
    key = tmp_path / "secrets.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    value = f"s3cr3t-{uuid.uuid4().hex}"
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", secrets_key_file=str(key), lease_ttl=10)
    try:
        mesh.start_controller()
        mesh.add_agent("n1", leave_running=True)
        client = mesh.client()
        client.set_secret("api-key", value)
        wf = Workflow("adopted")
        wf.task(
            "call",
            py(
                "import os, sys, time; print('key is', os.environ['API_KEY'], flush=True); "
                "time.sleep(4); print('done', flush=True)"
            ),
            env={"API_KEY": Secret("api-key")},
        )
        run = client.submit(wf)
        out = None

        def printed() -> bool:
            nonlocal out
            files = list((tmp_path / "agents" / "n1").rglob("stdout.log"))
            return bool(files) and b"key is" in files[0].read_bytes()

        mesh.wait_for(printed, 20, "the task printed its secret")
        # The agent restarts (an upgrade, say) and adopts the running attempt.
        mesh.stop_agent("n1", leave_running=True)
        mesh.add_agent("n1", leave_running=True)
        final = run.wait(timeout=30)
        call = by_name(final)["call"]
        assert [a.number for a in call.attempts] == [1], "adopted, not retried"
        assert call.state == t.TaskState.TASK_STATE_SUCCEEDED, call
        assert value not in call.stdout_tail, (
            f"the stored report of the adopted attempt shows the secret: {call.stdout_tail!r}"
        )
        assert "[secret]" in call.stdout_tail
    finally:
        mesh.close()
    for kv in _etcd_values(etcd.endpoint, prefix):
        assert value.encode() not in kv, "etcd holds the secret in plaintext"
