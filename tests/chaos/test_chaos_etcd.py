"""etcd failures under a running workflow: one of three members lost changes nothing a user
sees; a second lost (no quorum) makes calls answer UNAVAILABLE saying so; both back → serving
within the TTL; a lone etcd restarted. No Tether process is restarted, nothing is lost."""

from __future__ import annotations

import asyncio
import time

import pytest
from chaos_records import TTL, check, recorded_workflow
from helpers import EtcdCluster, success_events, wait_for

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import EtcdProcess
from tether.sdk.errors import TimeoutError as SdkTimeout
from tether.sdk.errors import UnavailableError

pytestmark = pytest.mark.timeout(150)


def _done(run) -> int:
    return sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in run.status().tasks)


def _serves(client) -> bool:
    try:
        return bool(client.nodes())
    except (UnavailableError, SdkTimeout):
        return False


def _no_quorum_message(client, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    message = ""
    while time.monotonic() < deadline:
        try:
            client.nodes()
        except UnavailableError as e:
            message = e.message
            if "quorum" in message:
                return message
        except SdkTimeout:  # the controller is still waiting on etcd itself
            pass
        time.sleep(0.1)
    return message


def test_members_lost_one_then_two_then_back(process_mesh, prefix, tmp_path, chaos_report):
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        mesh = process_mesh(endpoints=cluster.endpoints)
        mesh.add_agent("n1")
        mesh.add_agent("n2")
        records = tmp_path / "records.jsonl"
        run = mesh.client.submit(recorded_workflow("etcd-members", records, 12, 2, 0.4))
        wait_for(lambda: _done(run) >= 2, 30, "the run under way")
        cluster.kill("m0")
        before = _done(run)
        for _ in range(5):  # one member down: calls keep working
            assert "n1" in mesh.node_names()
        wait_for(lambda: _done(run) > before, 20, "progress with one member down")
        cluster.kill("m1")
        lost = time.time()
        message = _no_quorum_message(mesh.client, 30)
        noticed = time.time() - lost
        assert "etcd has no quorum" in message, message
        time.sleep(max(0.0, TTL + 1 - (time.time() - lost)))  # longer than the agents' grace
        cluster.start("m0")
        cluster.start("m1")
        wait_for(cluster.healthy, 30, "quorum back")
        back = time.time()
        wait_for(lambda: _serves(mesh.client), 30, "service back")
        serving = time.time() - back
        final = run.wait(timeout=90)
        assert all(c.proc.poll() is None for c in mesh.controllers)  # never restarted
        assert all(a.poll() is None for a in mesh.agents.values())
        counts = asyncio.run(success_events(cluster.endpoints.split(",")[2], prefix, by_run=True))
        numbers = check([final], records, counts)
        numbers.update(
            no_quorum_answered_s=round(noticed, 3),
            no_quorum_for_s=round(back - lost, 1),
            serving_after_quorum_s=round(serving, 3),
        )
        chaos_report["etcd_quorum_loss"] = numbers
        assert serving <= TTL, serving
    finally:
        cluster.stop()


def test_lone_etcd_restarted(process_mesh, prefix, tmp_path, chaos_report):
    etcd = EtcdProcess(tmp_path / "etcd").start()
    try:
        mesh = process_mesh(endpoints=etcd.endpoint)
        mesh.add_agent("n1")
        records = tmp_path / "records.jsonl"
        run = mesh.client.submit(recorded_workflow("etcd-restart", records, 10, 2, 0.4))
        wait_for(lambda: _done(run) >= 2, 30, "the run under way")
        etcd.stop()
        stopped = time.time()
        time.sleep(5)
        etcd.start()
        started = time.time()
        wait_for(lambda: _serves(mesh.client), 30, "service back")
        serving = time.time() - started
        final = run.wait(timeout=90)
        assert all(c.proc.poll() is None for c in mesh.controllers)
        counts = asyncio.run(success_events(etcd.endpoint, prefix, by_run=True))
        numbers = check([final], records, counts)
        numbers.update(etcd_down_s=round(started - stopped, 1), serving_after_s=round(serving, 3))
        chaos_report["lone_etcd_restart"] = numbers
        assert serving <= TTL, serving
    finally:
        etcd.stop()
