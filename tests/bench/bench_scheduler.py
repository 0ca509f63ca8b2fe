"""Benchmark: the scheduler — makespan of each policy on simulated DAGs, critical-path
against fifo on a real mesh, and placement decisions per second of the pure core.

    .venv/bin/python tests/bench/bench_scheduler.py [--seeds 5] [--skip-mesh]

Prints one JSON object:

- ``simulated``: random layered DAGs (100 to 1,000 tasks, log-normal durations, 1-3 parents
  each from earlier layers, 1 or 2 CPUs each) run on in-memory nodes (8 nodes x 4 CPUs) by
  an event simulation that calls :func:`tether.controller.scheduler.plan` whenever a task
  ends. For each policy, the makespan divided by the lower bound max(critical path, total
  CPU-seconds / total CPUs): median, p90 and max, and ``critical_path_beats_fifo`` (on how
  many DAGs critical-path's makespan is <= fifo's).
- ``mesh``: a real mesh (etcd with fsync, controller, one agent with 2 task slots, the process
  runtime): a chain of 6 x 0.5 s tasks beside 20 x 0.25 s tasks listed first, durations
  declared; wall time of fifo and of critical-path in the same run, and the lower bound.
- ``decisions_per_s``: one placement pass of 10,000 ready tasks (mixed shapes, 10% with a
  selector, 5% needing a GPU) over 1,000 nodes (every tenth with 8 GPUs, four zones), per
  policy: tasks decided per second of wall time and of this process's CPU time (best of 3;
  the CPU figure is steadier on a shared machine), and how many were bound.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tether.controller.critical_path import remaining_paths
from tether.controller.policies import POLICIES, get_policy
from tether.controller.scheduler import NodeView, TaskRequest, plan
from tether.controller.selectors import Constraints

SIZES = (100, 250, 500, 1000)


def layered_dag(n: int, rng: random.Random) -> dict[str, tuple[float, int, list[str]]]:
    """name -> (duration s, cpu, parents)."""
    layers = rng.randint(5, 20)
    names: list[list[str]] = [[] for _ in range(layers)]
    for i in range(n):
        names[i % layers if i < layers else rng.randrange(layers)].append(f"t{i}")
    dag = {}
    for li, layer in enumerate(names):
        earlier = [x for lay in names[:li] for x in lay]
        for name in layer:
            k = min(len(earlier), rng.randint(1, 3))
            parents = rng.sample(earlier, k) if li else []
            dag[name] = (rng.lognormvariate(0, 1), rng.choice([1, 1, 1, 2]), parents)
    return dag


def simulate(dag, policy_name: str, nodes: int = 8, cpus: int = 4) -> float:
    """Makespan of ``dag`` placed by ``policy_name`` on ``nodes`` x ``cpus``."""
    policy = get_policy(policy_name)
    ranks = remaining_paths({k: v[0] for k, v in dag.items()}, {k: v[2] for k, v in dag.items()})
    children: dict[str, list[str]] = {k: [] for k in dag}
    waiting = {k: len(v[2]) for k, v in dag.items()}
    for k, v in dag.items():
        for p in v[2]:
            children[p].append(k)
    order = {k: i for i, k in enumerate(dag)}
    ready = [k for k, w in waiting.items() if w == 0]
    used = {f"n{i}": 0 for i in range(nodes)}
    running: list[tuple[float, str, str]] = []
    clock = 0.0
    seq = 0
    readied: dict[str, int] = {}
    for k in ready:
        readied[k] = seq
        seq += 1
    while ready or running:
        views = [NodeView(n, cpu_total=cpus, cpu_used=u, memory_total=1) for n, u in used.items()]
        reqs = [TaskRequest(k, cpu=dag[k][1], seq=readied[k], rank=ranks[k]) for k in ready]
        p = plan(reqs, views, policy)
        for b in p.bindings:
            used[b.node] += dag[b.key][1]
            heapq.heappush(running, (clock + dag[b.key][0], b.key, b.node))
        placed = {b.key for b in p.bindings}
        ready = [k for k in ready if k not in placed]
        if not running:
            raise RuntimeError("nothing runs and nothing can be placed")
        clock, done, node = heapq.heappop(running)
        finished = [(done, node)]
        while running and running[0][0] <= clock + 1e-12:
            _, d2, n2 = heapq.heappop(running)
            finished.append((d2, n2))
        for d, n in finished:
            used[n] -= dag[d][1]
            for c in sorted(children[d], key=order.get):
                waiting[c] -= 1
                if waiting[c] == 0:
                    ready.append(c)
                    readied[c] = seq
                    seq += 1
    return clock


def lower_bound(dag, nodes: int = 8, cpus: int = 4) -> float:
    cp = max(
        remaining_paths(
            {k: v[0] for k, v in dag.items()}, {k: v[2] for k, v in dag.items()}
        ).values()
    )
    work = sum(v[0] * v[1] for v in dag.values())
    return max(cp, work / (nodes * cpus))


def bench_simulated(seeds: int) -> dict:
    ratios: dict[str, list[float]] = {p: [] for p in POLICIES}
    wins = 0
    count = 0
    for size in SIZES:
        for seed in range(seeds):
            dag = layered_dag(size, random.Random(seed * 7919 + size))
            lb = lower_bound(dag)
            spans = {p: simulate(dag, p) for p in POLICIES}
            for p, span in spans.items():
                ratios[p].append(span / lb)
            wins += spans["critical-path"] <= spans["fifo"] + 1e-9
            count += 1

    def summary(xs):
        xs = sorted(xs)
        return {
            "median": round(statistics.median(xs), 4),
            "p90": round(xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))], 4),
            "max": round(xs[-1], 4),
        }

    return {
        "dags": count,
        "sizes": list(SIZES),
        "seeds": seeds,
        "makespan_over_lower_bound": {p: summary(r) for p, r in ratios.items()},
        "critical_path_beats_fifo": f"{wins}/{count}",
    }


def bench_decisions(repeat: int = 3) -> dict:
    rng = random.Random(1)
    nodes = [
        NodeView(
            f"n{i:04d}",
            cpu_total=64,
            memory_total=256 << 30,
            gpu_indices=tuple(range(8)) if i % 10 == 0 else (),
            labels=(("zone", f"z{i % 4}"),),
        )
        for i in range(1000)
    ]
    zone1 = Constraints(selector=(("zone", "z1"),))
    tasks = [
        TaskRequest(
            i,
            cpu=rng.choice([0.5, 1, 2, 4]),
            memory=rng.choice([1, 2, 4]) << 30,
            gpu=1 if rng.random() < 0.05 else 0,
            priority=rng.choice([10, 50, 50, 90]),
            seq=i,
            rank=rng.random() * 100,
            constraints=zone1 if rng.random() < 0.1 else Constraints(),
        )
        for i in range(10_000)
    ]
    out = {}
    for name in POLICIES:
        best = best_cpu = float("inf")
        bound = 0
        for _ in range(repeat):
            start, cpu = time.perf_counter(), time.process_time()
            p = plan(tasks, nodes, get_policy(name))
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - cpu)
            bound = len(p.bindings)
        out[name] = {
            "decisions_per_s": round(len(tasks) / best),
            "decisions_per_cpu_s": round(len(tasks) / best_cpu),
            "bound": bound,
        }
    return {"nodes": len(nodes), "ready_tasks": len(tasks), "target": 20_000, "policies": out}


async def bench_mesh() -> dict:
    from local_mesh import local_mesh

    from tether.sdk import Client, Workflow

    def workflow(policy: str) -> Workflow:
        wf = Workflow(f"chain-beside-shorts-{policy}", policy=policy)
        for i in range(20):
            wf.task(f"short{i}", ["sleep", "0.25"], expected_duration=0.25)
        prev = None
        for i in range(6):
            wf.task(
                f"chain{i}",
                ["sleep", "0.5"],
                depends_on=[prev] if prev else [],
                expected_duration=0.5,
            )
            prev = f"chain{i}"
        return wf

    async with local_mesh(agents=1, slots=2) as (server, _):
        client = Client(server.address, timeout=60)
        walls = {}
        for policy in ("fifo", "critical-path", "fifo", "critical-path"):
            start = time.perf_counter()
            run = await asyncio.to_thread(client.submit, workflow(policy))
            await asyncio.to_thread(run.wait, 120)
            walls.setdefault(policy, []).append(time.perf_counter() - start)
        client.close()
    return {
        "slots": 2,
        "lower_bound_s": 4.0,
        "wall_s": {p: round(min(w), 3) for p, w in walls.items()},
        "critical_path_over_fifo": round(min(walls["critical-path"]) / min(walls["fifo"]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--skip-mesh", action="store_true")
    args = ap.parse_args()
    result = {
        "decisions": bench_decisions(),
        "simulated": bench_simulated(args.seeds),
    }
    if not args.skip_mesh:
        result["mesh"] = asyncio.run(bench_mesh())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
