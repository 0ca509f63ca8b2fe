"""The machine's floor for a gRPC round trip: a bare echo, measured beside the latency figures.

A no-op unary call from a blocking client (the SDK's kind) to a ``grpc.aio`` server (the
controller's and agent's kind) in another process, with no handler work, interceptors or
etcd. Measured twice: back to back, and after a pause of the caller, as between the
one-at-a-time submits of a latency run. A process that has slept a while answers more slowly
than one answering back to back (on the 2-core VM these benchmarks ran on, two to three times:
its CPU idled or ran others meanwhile), and a submit crosses several processes and threads
(client, controller, etcd, agent, and each ``grpc.aio`` process's poller thread) before its
task starts.

    python grpc_floor.py serve    # the echo server: prints its port, serves until killed
"""

from __future__ import annotations

import asyncio
import select
import statistics
import subprocess
import sys
import time

import grpc
from open_loop import pct

_METHOD = "/tether.bench.Echo/Echo"


def _serve() -> None:
    async def run() -> None:
        async def echo(request: bytes, _context) -> bytes:
            return request

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tether.bench.Echo", {"Echo": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def grpc_floor(calls: int = 200, idle: float = 0.01) -> dict:
    """Round-trip milliseconds of a no-op gRPC call, back to back and after ``idle`` seconds
    of idling before each call (p50 and p99 of ``calls`` each); ``{"error": ...}`` when it
    cannot be measured, so that the benchmark around it keeps its other figures."""
    try:
        return _measure(calls, idle)
    except Exception as e:  # a baseline that failed must not lose the run it sits in
        return {"error": f"{type(e).__name__}: {e}"}


def _measure(calls: int, idle: float) -> dict:
    with subprocess.Popen(
        [sys.executable, __file__, "serve"], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            return _against(server, calls, idle)
        finally:
            server.kill()


def _against(server: subprocess.Popen, calls: int, idle: float) -> dict:
    ready, _, _ = select.select([server.stdout], [], [], 30)
    if not ready:
        raise TimeoutError("the echo server did not start in 30 s")
    port = int(server.stdout.readline())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(_METHOD)
        for _ in range(50):  # connection and first-call costs
            call(b"x", timeout=5)

        def timed(pause: float) -> list[float]:
            out = []
            for _ in range(calls):
                if pause:
                    time.sleep(pause)
                start = time.perf_counter()
                call(b"x", timeout=5)
                out.append((time.perf_counter() - start) * 1000)
            return out

        busy, rested = timed(0.0), timed(idle)
    return {
        "back_to_back_p50": round(statistics.median(busy), 2),
        "back_to_back_p99": round(pct(busy, 99), 2),
        "after_idle_p50": round(statistics.median(rested), 2),
        "after_idle_p99": round(pct(rested, 99), 2),
        "idle_s": idle,
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        _serve()
    else:
        print(grpc_floor())
