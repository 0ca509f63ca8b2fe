"""Benchmark: the control plane alone — a controller process and etcd (fsync on), driven by
simulated agents — beside Ray, Dask and etcd's raw transaction rate, measured in the same run.

    .venv/bin/python tests/bench/bench_control_plane.py [--agents 50] [--tasks 10000]
        [--ray-python /path/to/python-with-ray] [--dask-python /path/to/python-with-dask]

The controller runs as its own process (``tether controller``) so its CPU time is its own;
this process holds the simulated agents (:mod:`sim_agents`: real ``AgentService`` streams that
succeed each assignment at once) and the client. Prints one JSON object:

- ``etcd_baseline_txn_per_s``: single-put transactions/s straight to etcd (16 in flight);
- ``tasks_per_s``: no-op tasks of one wide workflow completed per second, and
  ``ratio_to_etcd_txn`` / ``ratio_to_ray`` / ``ratio_to_dask``;
- ``dag_seconds``: a 1,000-task layered DAG (10 layers of 100, two parents each);
- ``round_trip_ms``: submit of a one-task run -> its SUCCEEDED result, p50/p99, one at a time;
- ``submit_to_running_ms``: submit -> the attempt's start as the agent reports it;
- ``grpc_echo_rtt_ms``: the machine's floor for one gRPC round trip (:mod:`grpc_floor`), back
  to back and after an idle moment, measured in the same run;
- ``controller_cpu_s_per_1k_tasks`` and the etcd requests per task; the CPU of this process
  (simulated agents and client) and of etcd per 1,000 tasks, which share the same cores;
- ``ray``: :mod:`ray_baseline`'s figures, when ``--ray-python`` is given or Ray imports here
  (``ray_tasks_per_s`` and ``ray_dag_seconds`` also at the top level, with ``ratio_to_ray``
  and ``dag_ratio_to_ray``);
- ``dask``: :mod:`dask_baseline`'s figures (a ``LocalCluster`` of one single-threaded worker
  process per core), when ``--dask-python`` is given or ``dask.distributed`` imports here
  (``dask_tasks_per_s``, ``dask_dag_seconds``, ``ratio_to_dask`` and ``dag_ratio_to_dask`` also
  at the top level).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from grpc_floor import grpc_floor
from local_mesh import etcd_baseline
from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import SimAgents, controller_process, cpu_seconds, etcd_requests

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import EtcdProcess
from tether.sdk import Client, Workflow

HERE = Path(__file__).resolve().parent


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def layered_dag(layers: int, width: int) -> Workflow:
    wf = Workflow("layered")
    for layer in range(layers):
        for i in range(width):
            deps = [f"l{layer - 1}-{i}", f"l{layer - 1}-{(i + 1) % width}"] if layer else []
            wf.task(f"l{layer}-{i}", ["true"], depends_on=deps)
    return wf


def measure(address: str, pid: int, endpoint: str, args, etcd_pid: int = 0) -> dict:
    client = Client(address, timeout=120)
    warm = Workflow("warm")
    for i in range(200):
        warm.task(f"w{i}", ["true"])
    client.submit(warm).wait(timeout=120)

    wide = Workflow("wide")
    for i in range(args.tasks):
        wide.task(f"t{i}", ["true"])
    cpu0, etcd0 = cpu_seconds(pid), etcd_requests(endpoint)
    # The rest of the machine's two cores: this process (simulated agents and client) and etcd.
    own0, etcd_cpu0 = cpu_seconds(os.getpid()), cpu_seconds(etcd_pid) if etcd_pid else 0.0
    start = time.perf_counter()
    final = client.submit(wide).wait(timeout=600)
    elapsed = time.perf_counter() - start
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    cpu, etcd1 = cpu_seconds(pid) - cpu0, etcd_requests(endpoint)
    own = cpu_seconds(os.getpid()) - own0
    etcd_cpu = (cpu_seconds(etcd_pid) if etcd_pid else 0.0) - etcd_cpu0

    start = time.perf_counter()
    dag = client.submit(layered_dag(args.layers, args.width)).wait(timeout=600)
    dag_s = time.perf_counter() - start
    assert dag.state == t.RunState.RUN_STATE_SUCCEEDED, dag.message

    rtts, to_running = [], []
    one = Workflow("one")
    one.task("x", ["true"])
    for _ in range(args.latency_runs):
        t0 = time.time()
        p0 = time.perf_counter()
        done = client.submit(one).wait(timeout=30)
        rtts.append((time.perf_counter() - p0) * 1000)
        started = done.tasks[0].attempts[-1].started_at.ToNanoseconds() / 1e9
        to_running.append((started - t0) * 1000)
    client.close()
    return {
        "tasks": args.tasks,
        "tasks_per_s": round(args.tasks / elapsed, 1),
        "wide_run_seconds": round(elapsed, 3),
        "controller_cpu_s_per_1k_tasks": round(cpu / args.tasks * 1000, 3),
        "sim_agents_and_client_cpu_s_per_1k_tasks": round(own / args.tasks * 1000, 3),
        "etcd_cpu_s_per_1k_tasks": round(etcd_cpu / args.tasks * 1000, 3),
        "etcd_txns_per_task": round((etcd1["txn"] - etcd0["txn"]) / args.tasks, 3),
        "etcd_puts_per_task": round((etcd1["put"] - etcd0["put"]) / args.tasks, 3),
        "dag_tasks": args.layers * args.width,
        "dag_seconds": round(dag_s, 3),
        "round_trip_ms": {"p50": round(statistics.median(rtts), 2), "p99": round(pct(rtts, 99), 2)},
        "submit_to_running_ms": {
            "p50": round(statistics.median(to_running), 2),
            "p99": round(pct(to_running, 99), 2),
        },
    }


def baseline_figures(python: str, module: str, script: str, args) -> dict | None:
    """Run a baseline script under ``python`` (or, without one, this Python where ``module``
    imports; None otherwise); its last line of stdout is its JSON figures."""
    if not python:
        if importlib.util.find_spec(module) is None:
            return None
        python = sys.executable
    out = subprocess.run(
        [python, str(HERE / script), "--tasks", str(args.tasks)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


async def main_async(args) -> dict:
    tmp = new_scratch_dir("tether-bench-cp-")
    etcd = EtcdProcess(tmp / "etcd").start()
    try:
        baseline = await etcd_baseline(etcd.endpoint)
        async with controller_process(etcd.endpoint, tmp / "controller.log") as (address, pid):
            async with SimAgents(address, args.agents, args.slots):
                result = await asyncio.to_thread(
                    measure, address, pid, etcd.endpoint, args, etcd.proc.pid
                )
    finally:
        etcd.stop()
        remove_scratch_dir(tmp)
    out = {
        "etcd_baseline_txn_per_s": round(baseline, 1),
        **result,
        "ratio_to_etcd_txn": round(result["tasks_per_s"] / baseline, 3),
        "grpc_echo_rtt_ms": await asyncio.to_thread(grpc_floor),
        "agents": args.agents,
        "slots_per_agent": args.slots,
        "cpus": len(os.sched_getaffinity(0)),
    }
    ray = await asyncio.to_thread(baseline_figures, args.ray_python, "ray", "ray_baseline.py", args)
    if ray is not None:
        out["ray"] = ray
        if "ray_tasks_per_s" in ray:
            # Also at the top level, under the names the issue gives them.
            out["ray_tasks_per_s"] = ray["ray_tasks_per_s"]
            out["ray_dag_seconds"] = ray["ray_dag_seconds"]
            out["ratio_to_ray"] = round(result["tasks_per_s"] / ray["ray_tasks_per_s"], 3)
            out["dag_ratio_to_ray"] = round(result["dag_seconds"] / ray["ray_dag_seconds"], 3)
    dask = await asyncio.to_thread(
        baseline_figures, args.dask_python, "distributed", "dask_baseline.py", args
    )
    if dask is not None:
        out["dask"] = dask
        if "dask_tasks_per_s" in dask:
            out["dask_tasks_per_s"] = dask["dask_tasks_per_s"]
            out["dask_dag_seconds"] = dask["dask_dag_seconds"]
            out["ratio_to_dask"] = round(result["tasks_per_s"] / dask["dask_tasks_per_s"], 3)
            out["dag_ratio_to_dask"] = round(result["dag_seconds"] / dask["dask_dag_seconds"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--slots", type=int, default=8, help="max tasks at once per agent")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--latency-runs", type=int, default=100)
    ap.add_argument("--ray-python", default="", help="a Python that has Ray, for the baseline")
    ap.add_argument(
        "--dask-python", default="", help="a Python that has dask.distributed, for the baseline"
    )
    args = ap.parse_args()
    from tether.sdk.telemetry import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
