"""Dask's figures for the same workloads, for a baseline measured in the same run.

    /path/to/python-with-dask tests/bench/dask_baseline.py [--tasks 10000] [--cpus 2]

Runs with any Python that has ``dask.distributed`` (it imports nothing from Tether) and prints
one JSON object: no-op tasks/s, a 1,000-task layered DAG (10 layers of 100, two parents each)
wall time, and one task's round trip p50/p99. The cluster is a ``LocalCluster`` of ``--cpus``
worker processes with one thread each, as Ray gets ``--cpus`` workers in :mod:`ray_baseline`.
With ``--load-curve 100,200,…`` it instead offers each load (tasks/s, open loop, a batch every
``--tick`` s for ``--seconds``) and prints achieved tasks/s and latency p50/p99 per level, as
``bench_load_curve.py`` does for Tether.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

from open_loop import offer, pct


def noop(*_parents):
    """A task that does nothing; its parents are arguments only so that it waits for them."""
    return None


def check(futures) -> None:
    """Fail loudly if any task errored, so a broken cluster is not reported as a fast one."""
    bad = [f for f in futures if f.status != "finished"]
    if bad:
        raise RuntimeError(f"{len(bad)} tasks did not finish, e.g. {bad[0].status}")


def load_level(client, level: float, seconds: float, tick: float) -> dict:
    """:func:`open_loop.offer` for Dask; a task's latency is its submit to when ``collect``
    returned it."""
    from distributed import as_completed

    finished = as_completed()

    def submit(n: int) -> list:
        futures = client.map(noop, range(n), pure=False)
        finished.update(futures)
        return futures

    def collect(pending: dict, latencies: list[float], timeout: float) -> None:
        # Returns when every pending task is done or ``timeout`` has passed, and stamps all the
        # done ones with that moment, as ``ray.wait(num_returns=len(pending), timeout)`` does
        # in ray_baseline: the same granularity for both. Polling as_completed's queue costs
        # one callback per task; ``distributed.wait`` would start a coroutine per pending
        # future on every call.
        end = time.perf_counter() + timeout
        done: list = []
        while True:
            done += finished.next_batch(block=False)
            left = end - time.perf_counter()
            if len(done) == len(pending) or left <= 0:
                break
            time.sleep(min(left, 0.0005))
        now = time.perf_counter()
        check(done)
        for fut in done:
            latencies.append((now - pending.pop(fut)) * 1000)

    return offer(submit, collect, level, seconds, tick)


def measure(client, args) -> dict:
    """No-op tasks/s, the layered DAG's wall time and one task's round trip."""
    from distributed import wait

    # pure=False everywhere: otherwise equal arguments hash to the same key and Dask would
    # hand back an earlier phase's result instead of running the task.
    start = time.perf_counter()
    futures = client.map(noop, range(args.tasks), pure=False)
    wait(futures)
    tasks_per_s = args.tasks / (time.perf_counter() - start)
    check(futures)
    del futures

    start = time.perf_counter()
    # One client.map per layer: a batch per message, as the wide run is, not a message per task.
    layer = client.map(noop, range(args.width), pure=False)
    for _ in range(args.layers - 1):
        layer = client.map(noop, layer, layer[1:] + layer[:1], pure=False)
    wait(layer)
    dag_s = time.perf_counter() - start
    check(layer)
    del layer

    rtts = []
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        client.submit(noop, pure=False).result()
        rtts.append((time.perf_counter() - t0) * 1000)
    return {
        "dask_tasks_per_s": round(tasks_per_s, 1),
        "dask_dag_seconds": round(dag_s, 3),
        "dask_round_trip_ms": {
            "p50": round(statistics.median(rtts), 2),
            "p99": round(pct(rtts, 99), 2),
        },
    }


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
    import dask
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=args.cpus,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(args.cpus)
        client.gather(client.map(noop, range(200), pure=False))  # warm the workers up
        if args.load_curve:
            levels = [float(x) for x in args.load_curve.split(",")]
            out = {
                "dask_version": dask.__version__,
                "load_curve": [load_level(client, lv, args.seconds, args.tick) for lv in levels],
            }
        else:
            out = {"dask_version": dask.__version__, **measure(client, args)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
