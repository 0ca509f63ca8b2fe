"""Benchmark: achieved tasks/s and task latency against offered load, Tether beside Ray and Dask.

    .venv/bin/python tests/bench/bench_load_curve.py [--levels 100,200,400,800,1600]
        [--seconds 4] [--ray-python /path/to/python-with-ray]
        [--dask-python /path/to/python-with-dask] [--plot docs/load-curve.png]

Open loop: every ``--tick`` seconds a batch of ``level * tick`` no-op tasks is submitted (for
Tether one workflow per batch, through the SDK, to a controller process on etcd with fsync on,
with simulated agents — :mod:`sim_agents` — so the control plane is measured; for Ray the same
batches of ``noop.remote()``; for Dask one ``client.map`` per batch on a ``LocalCluster`` of one
single-threaded worker process per core), for ``--seconds``. A task's latency is its submit
(client clock) to its result (Tether: the task's recorded ``finished_at``; Ray: when
``ray.wait`` returned it; Dask: when ``as_completed`` had it, polled the way ``ray.wait`` is).
Prints one JSON object with, per level, the offered and achieved tasks/s and latency p50/p99
for each system, measured in the same run, and ``ray_version`` / ``dask_version``; ``--plot``
draws them (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import SimAgents, controller_process

from tether.controller.etcd_process import EtcdProcess
from tether.sdk import Client, Workflow
from tether.sdk.states import TERMINAL_RUN_STATES

HERE = Path(__file__).resolve().parent


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def tether_level(client: Client, level: float, seconds: float, tick: float) -> dict:
    """Offer ``level`` tasks/s for ``seconds``; wait for every run; measure."""
    batch = max(1, round(level * tick))
    ticks = max(1, round(seconds / tick))
    submitted: list[tuple[str, float]] = []
    lock = threading.Lock()

    def submit_batch(i: int) -> None:
        wf = Workflow(f"load-{level:g}-{i}")
        for j in range(batch):
            wf.task(f"t{j}", ["true"])
        at = time.time()
        run = client.submit(wf)
        with lock:
            submitted.append((run.id, at))

    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(ticks):
            delay = start + i * tick - time.time()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(submit_batch, i))
        for f in futures:
            f.result()
    offered_for = time.time() - start
    latencies, last = [], start
    for run_id, at in submitted:
        run = client.get_run(run_id)
        while run.state not in TERMINAL_RUN_STATES:
            time.sleep(0.05)
            run = client.get_run(run_id)
        for tk in run.tasks:
            done = tk.finished_at.ToNanoseconds() / 1e9
            latencies.append((done - at) * 1000)
            last = max(last, done)
    tasks = batch * ticks
    return {
        "offered_tasks_per_s": round(tasks / max(offered_for, tick * ticks), 1),
        "achieved_tasks_per_s": round(tasks / (last - start), 1),
        "latency_ms_p50": round(pct(latencies, 50), 2),
        "latency_ms_p99": round(pct(latencies, 99), 2),
        "tasks": tasks,
    }


async def tether_curve(args) -> list[dict]:
    tmp = new_scratch_dir("tether-bench-load-")
    etcd = EtcdProcess(tmp / "etcd").start()
    try:
        async with controller_process(etcd.endpoint, tmp / "controller.log") as (address, _pid):
            async with SimAgents(address, args.agents, args.slots):

                def measure() -> list[dict]:
                    with Client(address, timeout=120) as client:
                        tether_level(client, 100, 1.0, args.tick)  # warm up
                        return [
                            {"level": lv, **tether_level(client, lv, args.seconds, args.tick)}
                            for lv in args.levels
                        ]

                return await asyncio.to_thread(measure)
    finally:
        etcd.stop()
        remove_scratch_dir(tmp)


def baseline_curve(python: str, script: str, args) -> dict | None:
    """Run a baseline script's ``--load-curve`` under ``python``; its last line of stdout is
    its JSON (``load_curve`` and the system's version), or None when no ``python`` is given."""
    if not python:
        return None
    levels = ",".join(f"{lv:g}" for lv in args.levels)
    out = subprocess.run(
        [
            python,
            str(HERE / script),
            "--load-curve",
            levels,
            "--seconds",
            str(args.seconds),
            "--tick",
            str(args.tick),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_curve(args) -> dict | None:
    """:mod:`ray_baseline`'s load curve, when ``--ray-python`` is given."""
    return baseline_curve(args.ray_python, "ray_baseline.py", args)


def dask_curve(args) -> dict | None:
    """:mod:`dask_baseline`'s load curve, when ``--dask-python`` is given."""
    return baseline_curve(args.dask_python, "dask_baseline.py", args)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("Tether (simulated agents, etcd fsync on)", result["tether"], "tab:blue")]
    if isinstance(result.get("ray"), list):
        series.append((f"Ray {result.get('ray_version', '')}".strip(), result["ray"], "tab:orange"))
    if isinstance(result.get("dask"), list):
        label = f"Dask {result.get('dask_version', '')}".strip()
        series.append((label, result["dask"], "tab:green"))
    for label, points, color in series:
        offered = [p["offered_tasks_per_s"] for p in points]
        ax1.plot(offered, [p["achieved_tasks_per_s"] for p in points], "o-", c=color, label=label)
        ax2.plot(offered, [p["latency_ms_p99"] for p in points], "o-", c=color, label=label)
    top = max(p["offered_tasks_per_s"] for _, pts, _ in series for p in pts)
    ax1.plot([0, top], [0, top], ":", c="grey", label="achieved = offered")
    ax1.set(xlabel="offered load (tasks/s)", ylabel="achieved (tasks/s)", title="throughput")
    ax2.set(xlabel="offered load (tasks/s)", ylabel="p99 submit → result (ms)", title="latency")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"no-op tasks, {result['cpus']} cores, one run", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="100,200,400,800,1600")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--tick", type=float, default=0.1)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ray-python", default="")
    ap.add_argument("--dask-python", default="")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    args.levels = [float(x) for x in args.levels.split(",")]
    result: dict = {"cpus": len(os.sched_getaffinity(0)), "tick_s": args.tick}
    result["tether"] = asyncio.run(tether_curve(args))
    for name, got in (("ray", ray_curve(args)), ("dask", dask_curve(args))):
        if got is None:
            continue
        # The curve under the system's name and its version beside it, which the plot's
        # legend reads; a failed run keeps its error under the name instead.
        result[name] = got.get("load_curve", got)
        if f"{name}_version" in got:
            result[f"{name}_version"] = got[f"{name}_version"]
    if args.plot:
        plot(result, Path(args.plot))
        result["plot"] = args.plot
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
