"""Benchmark: thousands of agents heartbeating on one controller.

    .venv/bin/python tests/bench/bench_heartbeats.py [--agents 5000] [--seconds 60]

A controller process (``--lease-ttl 15``: heartbeats every 5 s) on etcd with fsync on; the
simulated agents (:mod:`sim_agents`, real ``AgentService`` streams over 50 channels) register,
then the controller's CPU time and etcd's write counters are read over ``--seconds``. Prints
one JSON object: ``controller_cores`` (CPU seconds per second), ``heartbeats_per_s``, and the
etcd puts and transactions per heartbeat (lease keep-alives are neither: they are not writes
to the key space).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import SimAgents, controller_process, cpu_seconds, etcd_requests

from tether.controller.etcd_process import EtcdProcess


async def main_async(args) -> dict:
    tmp = new_scratch_dir("tether-bench-hb-")
    etcd = EtcdProcess(tmp / "etcd").start()
    try:
        log = tmp / "controller.log"
        async with controller_process(etcd.endpoint, log, "--lease-ttl", "15") as (address, pid):
            start = time.monotonic()
            async with SimAgents(address, args.agents, slots=1, channels=50) as sims:
                registered_s = time.monotonic() - start
                # Let the registration burst settle before measuring the steady state.
                await asyncio.sleep(args.settle)
                cpu0, beats0 = cpu_seconds(pid), sims.heartbeats
                etcd0 = etcd_requests(etcd.endpoint)
                t0 = time.monotonic()
                await asyncio.sleep(args.seconds)
                elapsed = time.monotonic() - t0
                cpu = cpu_seconds(pid) - cpu0
                etcd1 = etcd_requests(etcd.endpoint)
                beats = sims.heartbeats - beats0
                interval = sims.agents[0].heartbeat_interval
    finally:
        etcd.stop()
        remove_scratch_dir(tmp)
    return {
        "agents": args.agents,
        "heartbeat_interval_s": interval,
        "registration_seconds": round(registered_s, 2),
        "measured_seconds": round(elapsed, 1),
        "heartbeats_per_s": round(beats / elapsed, 1),
        "controller_cores": round(cpu / elapsed, 3),
        "etcd_puts_per_heartbeat": round((etcd1["put"] - etcd0["put"]) / max(beats, 1), 4),
        "etcd_txns_per_heartbeat": round((etcd1["txn"] - etcd0["txn"]) / max(beats, 1), 4),
        "cpus": len(os.sched_getaffinity(0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    args = ap.parse_args()
    from tether.sdk.telemetry import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
