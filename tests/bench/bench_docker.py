"""Benchmark: start-to-exit latency of a trivial container through Tether's DockerRuntime,
against the raw ``docker`` SDK on the same image, in the same run.

    .venv/bin/python tests/bench/bench_docker.py [--runs 30] [--image tether-test/busybox:latest]

Needs a running engine (``DOCKER_HOST`` or the default socket) and the image
(``tests/docker/build_images.sh busybox``). Each sample runs ``true`` to completion:

- ``raw_sdk``: ``APIClient`` create → start → wait → remove, the least a client can do;
- ``raw_sdk_run``: the SDK's high-level ``containers.run(..., remove=True)``;
- ``tether``: ``DockerRuntime.start`` (pull policy check, labels, attempt mount, limits, init,
  log followers) → ``wait`` (exit status, OOM check, complete log files) → ``remove``.

Samples of the three alternate, so that drift on the machine hits them alike. Prints one JSON
object with p50/mean/p90 per method in milliseconds and ``tether_over_raw`` (ratio of medians;
the target is at most 1.15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import docker
from scratch import new_scratch_dir, remove_scratch_dir

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import LaunchSpec
from tether.agent.runtimes.docker import DockerRuntime


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def summary(ms: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
        "p90_ms": round(pct(ms, 90), 1),
    }


def raw_once(api: docker.APIClient, image: str) -> float:
    start = time.perf_counter()
    cid = api.create_container(image, ["true"])["Id"]
    api.start(cid)
    api.wait(cid)
    elapsed = time.perf_counter() - start
    api.remove_container(cid, force=True)
    return elapsed


def raw_run_once(client: docker.DockerClient, image: str) -> float:
    start = time.perf_counter()
    client.containers.run(image, ["true"], remove=True)
    return time.perf_counter() - start


async def tether_once(rt: DockerRuntime, image: str, work_dir: Path, i: int) -> float:
    d = layout.attempt_dir(work_dir, "bench", "noop", i)
    d.mkdir(parents=True)
    spec = LaunchSpec(
        name=f"bench-noop-{i}",
        command=["true"],
        env={"TETHER_OUTPUT_FILE": rt.task_path(d / layout.OUTPUT_FILE)},
        working_dir="",
        attempt_dir=d,
        stdout_path=d / layout.STDOUT_FILE,
        stderr_path=d / layout.STDERR_FILE,
        image=image,
        cpu=0.5,
        memory_bytes=64 * 2**20,
        labels={
            layout.RUN_LABEL: "bench",
            layout.TASK_LABEL: "noop",
            layout.ATTEMPT_LABEL: str(i),
        },
    )
    start = time.perf_counter()
    handle = await rt.start(spec)
    status = await handle.wait()
    elapsed = time.perf_counter() - start
    assert status.exit_code == 0, status
    await handle.remove()
    return elapsed


async def main(runs: int, image: str, warmup: int) -> dict:
    client = docker.from_env()
    api = client.api
    api.inspect_image(image)  # fail early without the image
    work_dir = new_scratch_dir("tether-bench-docker-")
    rt = DockerRuntime(AgentConfig(node="bench", runtime="docker", work_dir=work_dir))
    samples: dict[str, list[float]] = {"raw_sdk": [], "raw_sdk_run": [], "tether": []}
    try:
        for i in range(warmup + runs):
            # Rotate the order so no method always runs right after another.
            order = ["raw_sdk", "raw_sdk_run", "tether"]
            order = order[i % 3 :] + order[: i % 3]
            for method in order:
                if method == "raw_sdk":
                    s = await asyncio.to_thread(raw_once, api, image)
                elif method == "raw_sdk_run":
                    s = await asyncio.to_thread(raw_run_once, client, image)
                else:
                    s = await tether_once(rt, image, work_dir, i)
                if i >= warmup:
                    samples[method].append(s * 1000)
    finally:
        remove_scratch_dir(work_dir)
    info = api.version()
    result = {
        "benchmark": "container start-to-exit latency",
        "image": image,
        "runs": runs,
        "engine": {
            "version": info.get("Version"),
            "api": info.get("ApiVersion"),
            "os": info.get("Os"),
            "kernel": info.get("KernelVersion"),
        },
        **{k: summary(v) for k, v in samples.items()},
    }
    raw = statistics.median(samples["raw_sdk"])
    result["tether_over_raw"] = round(statistics.median(samples["tether"]) / raw, 3)
    result["tether_over_raw_mean"] = round(
        statistics.fmean(samples["tether"]) / statistics.fmean(samples["raw_sdk"]), 3
    )
    result["raw_run_over_raw"] = round(statistics.median(samples["raw_sdk_run"]) / raw, 3)
    result["target_max_ratio"] = 1.15
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image", default="tether-test/busybox:latest")
    args = parser.parse_args()
    try:
        out = asyncio.run(main(args.runs, args.image, args.warmup))
    except docker.errors.DockerException as e:
        sys.exit(f"bench_docker: {e}")
    print(json.dumps(out, indent=2))
