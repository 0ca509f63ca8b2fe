"""A local mesh for benchmarks: etcd (fsync on, as in production), a controller in this process
(with the garbage collection settings of `tether controller`), agents as subprocesses with the
process runtime; and etcd's raw transaction rate as a baseline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from etcd3aio import Etcd3Client
from etcd3aio._protobuf import RequestOp, rpc_pb2
from scratch import new_scratch_dir, remove_scratch_dir
from sim_agents import controller_process

from tether.controller.cli import tune_gc
from tether.controller.config import ControllerConfig
from tether.controller.etcd_process import EtcdProcess
from tether.controller.server import ControllerServer
from tether.sdk import Client


async def etcd_baseline(endpoint: str, n: int = 4000, concurrency: int = 16) -> float:
    """Single-put transactions per second straight to etcd, ``concurrency`` in flight."""
    async with Etcd3Client([endpoint]) as c:
        counter = iter(range(n))

        async def worker():
            for i in counter:
                put = rpc_pb2.PutRequest(key=f"/bench/{i}".encode(), value=b"x" * 200)
                await c.kv.txn([], [RequestOp(request_put=put)])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


@contextlib.asynccontextmanager
async def local_mesh(
    agents: int,
    slots: int,
    pids: list[int] | None = None,
    etcd_pids: list[int] | None = None,
    agents_dir: str | None = None,
    controller: list | None = None,
) -> AsyncIterator[tuple[ControllerServer | None, float]]:
    """Yield a started controller with ``agents`` registered, and the etcd baseline (txn/s).

    ``pids``, when given, receives the agents' process ids (to read their CPU time), and
    ``etcd_pids`` etcd's. ``agents_dir``: where the agents' work dirs go (default: beside
    etcd's data, in the system's temporary directory). ``controller``: when given, the
    controller is a ``tether controller`` process, as deployed, and this list receives its
    address, its pid and etcd's endpoint; None is yielded for the server then.
    """
    tmp = new_scratch_dir("tether-bench-")
    agents_root = new_scratch_dir("tether-bench-", agents_dir or tmp)
    etcd = EtcdProcess(tmp / "etcd").start()
    if etcd_pids is not None:
        etcd_pids.append(etcd.proc.pid)
    server = None
    procs = []
    stack = contextlib.AsyncExitStack()
    try:
        baseline = await etcd_baseline(etcd.endpoint)
        if controller is not None:
            address, pid = await stack.enter_async_context(
                controller_process(etcd.endpoint, tmp / "controller.log")
            )
            controller.extend([address, pid, etcd.endpoint])
        else:
            server = ControllerServer(
                ControllerConfig(
                    etcd_endpoints=(etcd.endpoint,), listen="127.0.0.1:0", prefix="/bench"
                )
            )
            await server.start()
            tune_gc()  # as `tether controller` does
            address = server.address
        # BENCH_AGENT_PROFILE=DIR: each agent writes a cProfile to DIR/agent-I.prof at exit.
        profile_dir = os.environ.get("BENCH_AGENT_PROFILE")
        for i in range(agents):
            out = f"{profile_dir}/agent-{i}.prof"
            profiler = ["-m", "cProfile", "-o", out] if profile_dir else []
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        *profiler,
                        "-m",
                        "tether.sdk.cli",
                        "agent",
                        "--controller",
                        address,
                        "--name",
                        f"bench-{i}",
                        "--work-dir",
                        str(agents_root / f"agent-{i}"),
                        "--max-tasks",
                        str(slots),
                        "--log-level",
                        "warning",
                        "--drain-grace",
                        "0s",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        if pids is not None:
            pids.extend(p.pid for p in procs)
        client = Client(address)
        while len(await asyncio.to_thread(client.nodes)) < agents:
            await asyncio.sleep(0.1)
        client.close()
        yield server, baseline
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if server is not None:
            await server.stop()
        await stack.aclose()
        etcd.stop()
        remove_scratch_dir(agents_root)
        remove_scratch_dir(tmp)
