"""The leader SIGKILLed mid-run: a standby serves and every agent is registered with it within
5 s, and the run finishes with nothing lost or run twice at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from chaos_records import check, recorded_workflow
from grpc_health.v1 import health_pb2
from helpers import health, success_events, wait_for

from tether.api.v1 import types_pb2 as t
from tether.sdk import Client

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING


def _registered_since(client, names: set[str], since: float) -> bool:
    try:
        nodes = client.nodes()
    except Exception:  # the standby may still be taking over
        return False
    fresh = {n.name for n in nodes if n.registered_at.ToNanoseconds() / 1e9 > since}
    return fresh >= names


def test_leader_sigkill_mid_run(process_mesh, etcd, prefix, tmp_path, chaos_report):
    mesh = process_mesh(controllers=2)
    names = {"n1", "n2", "n3"}
    for name in sorted(names):
        mesh.add_agent(name)
    records = tmp_path / "records.jsonl"
    run = mesh.client.submit(recorded_workflow("leader-kill", records, 4, 6, 0.6))
    wait_for(
        lambda: sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in run.status().tasks) >= 6,
        30,
        "the first layer done",
    )
    leader, standby = mesh.controllers
    killed = time.time()
    leader.kill()
    wait_for(lambda: health(standby.address, "tether.v1.ControllerService") == SERVING, 10, "")
    serving = time.time() - killed
    # Asked of the standby alone: a client that still tries the dead leader first would add
    # its own reconnect time to what is measured.
    with Client(standby.address, timeout=5) as client:
        wait_for(lambda: _registered_since(client, names, killed), 10, "every agent back")
    back = time.time() - killed
    final = run.wait(timeout=60)
    counts = asyncio.run(success_events(etcd.endpoint, prefix, by_run=True))
    numbers = check([final], records, counts)
    numbers.update(standby_serving_s=round(serving, 3), agents_back_s=round(back, 3))
    chaos_report["leader_sigkill"] = numbers
    assert back <= 5, (serving, back)
