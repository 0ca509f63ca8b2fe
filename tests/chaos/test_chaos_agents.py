"""Agents that die or are cut off: a SIGKILLed agent's task process dies with it and its
work runs elsewhere within the TTL; a partition shorter than the TTL costs nothing; a longer
one fences the attempt before its copy starts."""

from __future__ import annotations

import asyncio
import time

import pytest
from chaos_records import TTL, Records, check, recorded_workflow
from helpers import TcpProxy, success_events, wait_for

from tether.agent.runtimes.reaper import alive, start_ticks

pytestmark = pytest.mark.timeout(120)


def _finish(mesh, run, records, etcd, prefix) -> dict:
    final = run.wait(timeout=60)
    counts = asyncio.run(success_events(etcd.endpoint, prefix, by_run=True))
    return check([final], records, counts)


def _started_on(records, node: str, n: int) -> list:
    wait_for(lambda: len(Records.read(records).running_on(node)) >= n, 30, f"{n} on {node}")
    return Records.read(records).running_on(node)


def _copies_started(records, old: list) -> float:
    """Wait until every attempt in ``old`` has a later attempt started; when the last did."""
    keys = {(a.run, a.task) for a in old}

    def later():
        rec = Records.read(records)
        starts = [max(b.start for b in rec.of(*k)) for k in keys if len(rec.of(*k)) > 1]
        return max(starts) if len(starts) == len(keys) else None

    wait_for(lambda: later() is not None, 30, "copies of the attempts started")
    return later()


def test_sigkilled_agent_task_dies_with_it_and_runs_elsewhere(
    process_mesh, etcd, prefix, tmp_path, chaos_report
):
    mesh = process_mesh()
    mesh.add_agent("n1")
    records = tmp_path / "records.jsonl"
    run = mesh.client.submit(recorded_workflow("agent-kill", records, 2, 2, 2.0))
    victims = _started_on(records, "n1", 2)
    ticks = {a.pid: start_ticks(a.pid) for a in victims}
    mesh.add_agent("n2")  # joins after the placement, so the work to move is all on n1
    killed = time.time()
    mesh.kill_agent("n1")
    deadline = time.monotonic() + 10
    while any(alive(p, tk) for p, tk in ticks.items()) and time.monotonic() < deadline:
        time.sleep(0.005)
    gone = time.time() - killed
    assert not any(alive(p, tk) for p, tk in ticks.items()), "the task outlived its agent"
    rerun = _copies_started(records, victims) - killed
    numbers = _finish(mesh, run, records, etcd, prefix)
    numbers.update(task_process_gone_s=round(gone, 3), running_elsewhere_s=round(rerun, 3))
    chaos_report["agent_sigkill"] = numbers
    assert gone <= 1.0, gone
    assert rerun <= TTL + 1, rerun
    assert numbers["attempts_rerun"] == 2


def test_partition_shorter_than_the_ttl_costs_nothing(
    process_mesh, etcd, prefix, tmp_path, chaos_report
):
    mesh = process_mesh()
    proxy = TcpProxy(mesh.addresses)
    try:
        mesh.add_agent("n1", controller=proxy.address)
        records = tmp_path / "records.jsonl"
        run = mesh.client.submit(recorded_workflow("short-cut", records, 1, 3, 3.0))
        _started_on(records, "n1", 3)
        proxy.pause()
        time.sleep(TTL / 2)
        proxy.resume()
        numbers = _finish(mesh, run, records, etcd, prefix)
        numbers["blackhole_s"] = TTL / 2
        chaos_report["blackhole_shorter_than_ttl"] = numbers
        assert numbers["attempts_rerun"] == 0
    finally:
        proxy.close()


def test_partition_longer_than_the_ttl_fences_before_the_copy_starts(
    process_mesh, etcd, prefix, tmp_path, chaos_report
):
    mesh = process_mesh()
    proxy = TcpProxy(mesh.addresses)
    try:
        mesh.add_agent("n1", controller=proxy.address)
        records = tmp_path / "records.jsonl"
        run = mesh.client.submit(recorded_workflow("long-cut", records, 2, 2, 4.0))
        victims = _started_on(records, "n1", 2)
        ticks = {a.pid: start_ticks(a.pid) for a in victims}
        mesh.add_agent("n2")
        cut = time.time()
        proxy.pause()
        rerun = _copies_started(records, victims) - cut
        fenced = all(not alive(p, tk) for p, tk in ticks.items())
        time.sleep(max(0.0, 2 * TTL - (time.time() - cut)))
        proxy.resume()
        cut_for = time.time() - cut
        wait_for(lambda: "n1" in mesh.node_names(), 30, "n1 back after the partition")
        numbers = _finish(mesh, run, records, etcd, prefix)
        numbers.update(blackhole_s=round(cut_for, 1), running_elsewhere_s=round(rerun, 3))
        chaos_report["blackhole_longer_than_ttl"] = numbers
        assert fenced, "the cut-off agent's attempts still ran when their copies started"
        assert numbers["attempts_rerun"] == 2
        assert rerun <= TTL + 1, rerun
    finally:
        proxy.close()
