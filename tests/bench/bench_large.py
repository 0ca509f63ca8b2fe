"""Benchmark: a 10,000-task fan-out/fan-in workflow of no-op tasks through a local mesh.

    .venv/bin/python tests/bench/bench_large.py [--width 10000] [--agents 3]

One ``start`` task, ``width`` parallel no-op tasks depending on it, one ``join`` task depending
on all of them. Prints JSON: submit time, run time, tasks/s, the largest etcd request the
controller made (etcd refuses requests above 1.5 MiB), and etcd's raw transaction rate measured
in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from local_mesh import local_mesh

from tether.api.v1 import types_pb2 as t
from tether.controller.server import ControllerServer
from tether.sdk import Client, Workflow


def run_large(address: str, server: ControllerServer, width: int) -> dict:
    wf = Workflow("fan-out-fan-in")
    start = wf.task("start", ["true"])
    names = [wf.task(f"t{i}", ["true"], depends_on=[start]).name for i in range(width)]
    wf.task("join", ["true"], depends_on=names)
    client = Client(address, timeout=120)
    t0 = time.perf_counter()
    run = client.submit(wf)
    submitted = time.perf_counter() - t0
    final = run.wait(timeout=1800)
    elapsed = time.perf_counter() - t0
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    assert sum(tk.state == t.TaskState.TASK_STATE_SUCCEEDED for tk in final.tasks) == width + 2
    listed = sum(1 for _ in client.list_runs(page_size=100))
    client.close()
    return {
        "tasks": width + 2,
        "spec_bytes": wf.to_proto().ByteSize(),
        "submit_seconds": round(submitted, 3),
        "run_seconds": round(elapsed, 2),
        "tasks_per_s": round((width + 2) / elapsed, 1),
        "largest_etcd_request_bytes": server.store.max_request_bytes,
        "etcd_request_limit_bytes": int(1.5 * 2**20),
        "etcd_txns": server.store.txn_count,
        "runs_listed": listed,
    }


async def main_async(args) -> dict:
    async with local_mesh(args.agents, args.slots) as (server, baseline):
        result = await asyncio.to_thread(run_large, server.address, server, args.width)
    return {"etcd_baseline_txn_per_s": round(baseline, 1), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=10_000)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()
    from tether.sdk.telemetry import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
