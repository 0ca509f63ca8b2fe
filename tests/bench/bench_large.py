"""Benchmark: a 100,000-task fan-out/fan-in workflow against a controller subprocess.

    .venv/bin/python tests/bench/bench_large.py [--width 100000] [--agents 50] [--slots 8]
    .venv/bin/python tests/bench/bench_large.py --real-agents 3 --width 10000

One ``start`` task, ``width`` parallel no-op tasks depending on it, one ``join`` task depending
on all of them, submitted with one ``client.submit(wf)``. By default simulated agents (real
``AgentService`` streams that succeed every assignment at once, see ``sim_agents.py``) serve a
``tether controller`` subprocess, so that the controller's own memory and CPU are measured;
``--real-agents N`` runs N real agents with the process runtime instead.

Prints JSON: submit and run time, tasks/s, the CPU seconds the SDK and the controller spent in
the submit call, the controller's peak RSS (VmHWM) and CPU time,
the largest etcd request it made (its ``tether_etcd_largest_request_bytes`` metric; etcd
refuses requests above 1.5 MiB, the target is 256 KiB), its etcd transactions, and etcd's raw
single-put transaction rate measured in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

from local_mesh import etcd_baseline
from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import SimAgents, controller_process, cpu_seconds, etcd_requests

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import EtcdProcess, free_port
from tether.sdk import Client, Workflow

TARGETS = {
    "submit_seconds": 5.0,
    "controller_peak_rss_bytes": 2**30,
    "largest_etcd_request_bytes": 256 * 1024,
}


def fan_out_fan_in(width: int) -> Workflow:
    wf = Workflow("fan-out-fan-in")
    start = wf.task("start", ["true"])
    names = [wf.task(f"t{i}", ["true"], depends_on=[start]).name for i in range(width)]
    wf.task("join", ["true"], depends_on=names)
    return wf


def submit_and_wait(address: str, width: int, timeout: float, controller_pid: int = 0) -> dict:
    """Submit the workflow in one call, wait for it (polling the run list, which carries no
    tasks, so that the client does not stream every task change), then check every task.

    With ``controller_pid``, the controller's CPU seconds during the submit call are given
    too; the SDK's are this thread's (the simulated agents run on another)."""
    wf = fan_out_fan_in(width)
    client = Client(address, timeout=300)
    cpu0 = cpu_seconds(controller_pid) if controller_pid else 0.0
    sdk0 = time.thread_time()
    t0 = time.perf_counter()
    run = client.submit(wf)
    submitted = time.perf_counter() - t0
    sdk_cpu = time.thread_time() - sdk0
    submit_cpu = cpu_seconds(controller_pid) - cpu0 if controller_pid else None
    deadline = time.monotonic() + timeout
    while True:
        state = next((r.state for r in client.list_runs(page_size=10) if r.id == run.id), None)
        if state in (t.RunState.RUN_STATE_SUCCEEDED, t.RunState.RUN_STATE_FAILED):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run.id} did not finish in {timeout}s")
        time.sleep(0.5)
    elapsed = time.perf_counter() - t0
    final = client.get_run(run.id)
    client.close()
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    succeeded = sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in final.tasks)
    assert succeeded == width + 2, succeeded
    out = {
        "tasks": width + 2,
        "spec_bytes": wf.to_proto().ByteSize(),
        "submit_seconds": round(submitted, 3),
        "submit_sdk_cpu_seconds": round(sdk_cpu, 2),
        "run_seconds": round(elapsed, 2),
        "tasks_per_s": round((width + 2) / elapsed, 1),
    }
    if submit_cpu is not None:
        out["submit_controller_cpu_seconds"] = round(submit_cpu, 2)
    return out


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def metric(metrics_address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def run_sim(args, etcd: EtcdProcess, tmp: Path) -> dict:
    metrics_address = f"127.0.0.1:{free_port()}"
    extra = ["--max-tasks-per-run", str(args.width + 2), "--metrics-listen", metrics_address]
    if args.leader_ttl:
        extra += ["--leader-ttl", str(args.leader_ttl)]
    if args.policy:
        extra += ["--policy", args.policy]
    if os.environ.get("BENCH_LOG_LEVEL"):
        extra += ["--log-level", os.environ["BENCH_LOG_LEVEL"]]
    async with controller_process(etcd.endpoint, tmp / "controller.log", *extra) as (addr, pid):
        async with SimAgents(addr, args.agents, slots=args.slots, channels=args.channels):
            before = etcd_requests(etcd.endpoint)
            cpu0 = cpu_seconds(pid)
            result = await asyncio.to_thread(submit_and_wait, addr, args.width, args.timeout, pid)
            after = etcd_requests(etcd.endpoint)
            result.update(
                controller_cpu_seconds=round(cpu_seconds(pid) - cpu0, 1),
                controller_peak_rss_bytes=peak_rss_bytes(pid),
                largest_etcd_request_bytes=int(
                    metric(metrics_address, "tether_etcd_largest_request_bytes")
                ),
                etcd_txns=int(after["txn"] - before["txn"]),
                etcd_puts=int(after["put"] - before["put"]),
            )
    return result


async def run_real(args, etcd_unused, tmp_unused) -> dict:
    from local_mesh import local_mesh

    async with local_mesh(args.real_agents, args.slots) as (server, _):
        result = await asyncio.to_thread(submit_and_wait, server.address, args.width, args.timeout)
        result["largest_etcd_request_bytes"] = server.store.max_request_bytes
        result["etcd_txns"] = server.store.txn_count
    return result


async def main_async(args) -> dict:
    tmp = new_scratch_dir("tether-bench-large-")
    etcd = EtcdProcess(tmp / "etcd").start()
    try:
        baseline = await etcd_baseline(etcd.endpoint)
        if args.real_agents:
            etcd.stop()  # the local mesh starts its own
            result = await run_real(args, None, None)
        else:
            result = await run_sim(args, etcd, tmp)
    finally:
        etcd.stop()
        remove_scratch_dir(tmp)
    out = {
        "agents": args.real_agents or args.agents,
        "simulated": not args.real_agents,
        "etcd_baseline_txn_per_s": round(baseline, 1),
        **result,
        "etcd_request_limit_bytes": int(1.5 * 2**20),
    }
    if "etcd_txns" in out and out.get("run_seconds"):
        out["etcd_txn_per_s"] = round(out["etcd_txns"] / out["run_seconds"], 1)
        out["ratio_to_etcd_baseline"] = round(out["etcd_txn_per_s"] / baseline, 3)
    out["targets"] = {k: {"target": v, "met": out[k] <= v} for k, v in TARGETS.items() if k in out}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000, help="parallel tasks (default 100000)")
    ap.add_argument("--agents", type=int, default=50, help="simulated agents (default 50)")
    ap.add_argument("--channels", type=int, default=0, help="gRPC channels for them (0: one each)")
    ap.add_argument("--slots", type=int, default=8, help="tasks each agent runs at once")
    ap.add_argument(
        "--real-agents", type=int, default=0, help="run N real agents (process runtime) instead"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the run may take")
    ap.add_argument("--policy", default="", help="the controller's --policy (default: its own)")
    ap.add_argument(
        "--leader-ttl", type=int, default=0, help="the controller's --leader-ttl (0: its default)"
    )
    args = ap.parse_args()
    from tether.sdk.telemetry import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
