"""Batched agent streams: an agent that registers with ``batches`` gets what the controller
queued for it as ``ControllerBatch`` messages and may answer with ``AgentBatch``; an agent that
does not gets single messages only; a batch inside a batch is refused."""

from __future__ import annotations

import asyncio

import grpc
from helpers import Mesh

from tether.agent.supervision import now
from tether.api.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tether.sdk import Workflow

SUCCEEDED = types_pb2.TaskState.TASK_STATE_SUCCEEDED


class BatchAgent:
    """A raw agent stream that succeeds each assignment at once and records what it got."""

    def __init__(self, address: str, name: str, batches: bool, slots: int = 16) -> None:
        self.address = address
        self.name = name
        self.batches = batches
        self.slots = slots
        self.registered: agent_pb2.Registered | None = None
        self.received: list[str] = []  # kinds of the stream messages, batches as "batch"
        self.largest_batch = 0
        self.assigned = 0
        self.acks = 0
        self.error: grpc.aio.AioRpcError | None = None
        self.outbox: asyncio.Queue = asyncio.Queue()

    async def run(self) -> None:
        self.outbox.put_nowait(
            agent_pb2.AgentMessage(
                register=agent_pb2.Register(
                    node=self.name,
                    node_id=f"raw-{self.name}",
                    capacity=types_pb2.Resources(cpu=self.slots, memory_bytes=2**30),
                    agent_version="raw",
                    runtime="raw",
                    max_tasks=self.slots,
                    batches=self.batches,
                )
            )
        )

        async def requests():
            while (msg := await self.outbox.get()) is not None:
                yield msg

        async with grpc.aio.insecure_channel(self.address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect(requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("msg")
                    self.received.append(kind)
                    msgs = list(msg.batch.messages) if kind == "batch" else [msg]
                    self.largest_batch = max(self.largest_batch, len(msgs))
                    replies = []
                    for one in msgs:
                        k = one.WhichOneof("msg")
                        if k == "registered":
                            self.registered = one.registered
                        elif k == "assign":
                            self.assigned += 1
                            ts = now()
                            replies.append(
                                agent_pb2.AgentMessage(
                                    status=agent_pb2.TaskStatus(
                                        ref=one.assign.ref,
                                        state=SUCCEEDED,
                                        started_at=ts,
                                        finished_at=ts,
                                    )
                                )
                            )
                        elif k == "ack":
                            self.acks += 1
                    if self.batches and len(replies) > 1:
                        batch = agent_pb2.AgentBatch(messages=replies)
                        self.outbox.put_nowait(agent_pb2.AgentMessage(batch=batch))
                    else:
                        for r in replies:
                            self.outbox.put_nowait(r)
            except grpc.aio.AioRpcError as e:
                self.error = e
            finally:
                self.outbox.put_nowait(None)


def _wide(n: int) -> Workflow:
    wf = Workflow("wide")
    for i in range(n):
        wf.task(f"t{i}", ["true"])
    return wf


def _run_wide(mesh: Mesh, batches: bool) -> BatchAgent:
    """40 no-op tasks through one raw agent on 16 slots; the agent, once all are acked."""
    agent = BatchAgent(mesh.address, "raw", batches=batches)
    asyncio.run_coroutine_threadsafe(agent.run(), mesh.loop)
    mesh.wait_for(lambda: agent.registered is not None, 10, "registered")
    run = mesh.client().submit(_wide(40)).wait(timeout=30)
    assert run.state == types_pb2.RunState.RUN_STATE_SUCCEEDED
    assert all(tk.state == SUCCEEDED and tk.attempt == 1 for tk in run.tasks)
    mesh.wait_for(lambda: agent.acks == 40, 10, "every report acknowledged")
    assert agent.assigned == 40
    return agent


def test_a_batching_agent_gets_and_sends_batches(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        agent = _run_wide(mesh, batches=True)
        assert agent.registered.batches  # the controller reads AgentBatch
        # 40 tasks on 16 slots: a pass binds the free slots in one transaction and their
        # assignments go out together.
        assert "batch" in agent.received and agent.largest_batch > 1
    finally:
        mesh.close()


def test_an_agent_without_batches_gets_single_messages(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        agent = _run_wide(mesh, batches=False)
        assert "batch" not in agent.received and agent.largest_batch == 1
    finally:
        mesh.close()


def test_a_batch_inside_a_batch_is_refused(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        agent = BatchAgent(mesh.address, "nested", batches=True)
        fut = asyncio.run_coroutine_threadsafe(agent.run(), mesh.loop)
        mesh.wait_for(lambda: agent.registered is not None, 10, "registered")
        inner = agent_pb2.AgentMessage(
            batch=agent_pb2.AgentBatch(
                messages=[agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1))]
            )
        )
        outer = agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=[inner]))
        mesh.loop.call_soon_threadsafe(agent.outbox.put_nowait, outer)
        mesh.wait_for(lambda: agent.error is not None, 10, "the stream refused")
        assert agent.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch.messages" in agent.error.details()
    finally:
        mesh.close()
        locals().get("fut") and fut.cancel()
