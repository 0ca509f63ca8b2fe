"""Ray's figures for the same workloads, for a baseline measured in the same run.

    /path/to/python-with-ray tests/bench/ray_baseline.py [--tasks 10000] [--cpus 2]

Runs with any Python that has Ray (it imports nothing from Tether) and prints one JSON object:
no-op tasks/s, a 1,000-task layered DAG (10 layers of 100, two parents each) wall time, and
one task's round trip p50/p99. With ``--load-curve 100,200,…`` it instead offers each load
(tasks/s, open loop, a batch every ``--tick`` s for ``--seconds``) and prints achieved tasks/s and
latency p50/p99 per level, as ``bench_load_curve.py`` does for Tether.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from open_loop import offer, pct


def load_level(ray, noop, level: float, seconds: float, tick: float) -> dict:
    """:func:`open_loop.offer` for Ray; a task's latency is its submit to when ``ray.wait``
    returned it."""

    def collect(pending: dict, latencies: list[float], timeout: float) -> None:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        now = time.perf_counter()
        for ref in done:
            latencies.append((now - pending.pop(ref)) * 1000)

    return offer(lambda n: [noop.remote() for _ in range(n)], collect, level, seconds, tick)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--load-curve", default="")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--tick", type=float, default=0.1)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def noop(*_parents):
        return None

    ray.get([noop.remote() for _ in range(200)])  # warm the workers up
    if args.load_curve:
        levels = [float(x) for x in args.load_curve.split(",")]
        curve = [load_level(ray, noop, lv, args.seconds, args.tick) for lv in levels]
        print(json.dumps({"ray_version": ray.__version__, "load_curve": curve}))
        ray.shutdown()
        return
    start = time.perf_counter()
    ray.get([noop.remote() for _ in range(args.tasks)])
    tasks_per_s = args.tasks / (time.perf_counter() - start)

    start = time.perf_counter()
    layer = [noop.remote() for _ in range(args.width)]
    for _ in range(args.layers - 1):
        layer = [noop.remote(layer[i], layer[(i + 1) % args.width]) for i in range(args.width)]
    ray.get(layer)
    dag_s = time.perf_counter() - start

    rtts = []
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        rtts.append((time.perf_counter() - t0) * 1000)
    ray.shutdown()
    print(
        json.dumps(
            {
                "ray_version": ray.__version__,
                "ray_tasks_per_s": round(tasks_per_s, 1),
                "ray_dag_seconds": round(dag_s, 3),
                "ray_round_trip_ms": {
                    "p50": round(statistics.median(rtts), 2),
                    "p99": round(pct(rtts, 99), 2),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
