"""Simulated agents: real ``AgentService`` streams over real gRPC that succeed every assignment
at once, so that a benchmark measures the controller and etcd alone — as at cluster scale, where
the agents' own work is spread over many nodes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from tether.agent.supervision import now
from tether.api.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tether.controller.etcd_process import free_port
from tether.sdk import Client

__all__ = ["SimAgents", "controller_process", "cpu_seconds", "etcd_requests"]


class SimAgent:
    """One simulated node: registers, heartbeats, and answers each assignment with success
    (with ``batches``, as real agents do: the answers to one controller message in one)."""

    def __init__(
        self, channel: grpc.aio.Channel, name: str, slots: int, batches: bool = True
    ) -> None:
        self.batches = batches
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.name = name
        self.slots = slots
        self.registered = asyncio.Event()
        self.completed = 0
        self.heartbeats = 0
        self.heartbeat_interval = 0.0
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()

    def _register(self) -> agent_pb2.Register:
        return agent_pb2.Register(
            node=self.name,
            node_id=f"sim-{self.name}",
            capacity=types_pb2.Resources(cpu=float(self.slots), memory_bytes=64 * 2**30),
            agent_version="sim",
            runtime="sim",
            max_tasks=self.slots,
            batches=self.batches,
        )

    async def run(self) -> None:
        # Of thousands of streams opened at once, a few fail before their registration is
        # answered (INTERNAL, "Failed execute_batch", or CANCELLED); a real agent would
        # reconnect with backoff, and so does this one — but only until it is registered.
        backoff = 0.1
        while True:
            try:
                return await self._session()
            except grpc.aio.AioRpcError:
                if self.registered.is_set():
                    raise
                self._outbox = asyncio.Queue()
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(2.0, backoff * 2)

    async def _session(self) -> None:
        self._outbox.put_nowait(agent_pb2.AgentMessage(register=self._register()))

        async def requests():
            while (msg := await self._outbox.get()) is not None:
                yield msg

        call = self.stub.Connect(requests())
        beat: asyncio.Task | None = None
        batches = False  # the controller reads AgentBatch
        try:
            async for msg in call:
                kind = msg.WhichOneof("msg")
                replies = []
                for one in msg.batch.messages if kind == "batch" else (msg,):
                    kind = one.WhichOneof("msg")
                    if kind == "assign":
                        started = now()
                        replies.append(
                            agent_pb2.AgentMessage(
                                status=agent_pb2.TaskStatus(
                                    ref=one.assign.ref,
                                    state=types_pb2.TaskState.TASK_STATE_SUCCEEDED,
                                    exit_code=0,
                                    started_at=started,
                                    finished_at=started,
                                )
                            )
                        )
                        self.completed += 1
                    elif kind == "registered":
                        interval = one.registered.heartbeat_interval.ToNanoseconds() / 1e9
                        self.heartbeat_interval = interval
                        batches = one.registered.batches and self.batches
                        beat = asyncio.create_task(self._beat(self.heartbeat_interval or 1.0))
                        self.registered.set()
                    elif kind == "heartbeat_ack":
                        self.heartbeats += 1
                if batches and len(replies) > 1:
                    batch = agent_pb2.AgentBatch(messages=replies)
                    self._outbox.put_nowait(agent_pb2.AgentMessage(batch=batch))
                else:
                    for reply in replies:
                        self._outbox.put_nowait(reply)
        finally:
            if beat:
                beat.cancel()
            call.cancel()

    async def _beat(self, interval: float) -> None:
        seq = 0
        await asyncio.sleep(interval * random.random())  # as real agents' jitter spreads them
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            seq += 1
            self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq)))

    def close(self) -> None:
        self._outbox.put_nowait(None)


class SimAgents:
    """``count`` simulated agents in this process's event loop, on ``channels`` gRPC channels
    (default: one each; thousands of agents share fewer, their streams multiplexed).

    ``async with SimAgents(address, 50, slots=8) as sims:`` returns once all are registered.
    """

    def __init__(
        self,
        address: str,
        count: int,
        slots: int = 8,
        prefix: str = "sim",
        channels: int = 0,
    ) -> None:
        self.address = address
        self.count = count
        self.slots = slots
        self.prefix = prefix
        self.channel_count = channels or count
        self.agents: list[SimAgent] = []
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> SimAgents:
        for _ in range(self.channel_count):
            self._channels.append(grpc.aio.insecure_channel(self.address))
        for i in range(self.count):
            ch = self._channels[i % self.channel_count]
            agent = SimAgent(ch, f"{self.prefix}-{i:05d}", self.slots)
            self.agents.append(agent)
            self._tasks.append(asyncio.create_task(agent.run()))
        deadline = time.monotonic() + max(30.0, self.count / 50)
        for agent in self.agents:
            remaining = deadline - time.monotonic()
            await asyncio.wait_for(agent.registered.wait(), max(remaining, 0.1))
        return self

    async def __aexit__(self, *exc) -> None:
        for agent in self.agents:
            agent.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        for ch in self._channels:
            await ch.close()

    @property
    def completed(self) -> int:
        return sum(a.completed for a in self.agents)

    @property
    def heartbeats(self) -> int:
        return sum(a.heartbeats for a in self.agents)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def etcd_metric(endpoint: str, name: str) -> float:
    """Sum of one Prometheus counter from etcd's /metrics (e.g. its txn count)."""
    import urllib.request

    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def etcd_requests(endpoint: str) -> dict[str, float]:
    return {
        "txn": etcd_metric(endpoint, "etcd_mvcc_txn_total"),
        "put": etcd_metric(endpoint, "etcd_mvcc_put_total"),
    }


@contextlib.asynccontextmanager
async def controller_process(
    etcd_endpoint: str, log_path: Path, *extra: str
) -> AsyncIterator[tuple[str, int]]:
    """A ``tether controller`` process on ``etcd_endpoint``; yields (address, pid) once it
    answers. Its own process, so that its CPU time can be read apart from the agents'."""
    address = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        # BENCH_PROFILE=FILE: profile the controller (cProfile), written when it stops.
        profile = os.environ.get("BENCH_PROFILE")
        profiler = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen(
            [
                sys.executable,
                *profiler,
                "-m",
                "tether.sdk.cli",
                "controller",
                "--etcd",
                etcd_endpoint,
                "--listen",
                address,
                "--prefix",
                "/bench",
                "--rate-limit",
                "0",
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            client = Client(address, timeout=5)
            deadline = time.monotonic() + 60
            while True:
                try:
                    await asyncio.to_thread(client.nodes)
                    break
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.2)
            client.close()
            yield address, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)
