"""AgentSession.outgoing() must write what was queued before close()."""

from __future__ import annotations

import asyncio

import pytest

from tether.api.v1 import agent_pb2
from tether.controller.records import AgentSession


def _ack(seq: int) -> agent_pb2.ControllerMessage:
    return agent_pb2.ControllerMessage(heartbeat_ack=agent_pb2.HeartbeatAck(seq=seq))


def _seqs(msgs) -> list[int]:
    out = []
    for m in msgs:
        for one in m.batch.messages if m.WhichOneof("msg") == "batch" else (m,):
            out.append(one.heartbeat_ack.seq)
    return out


@pytest.mark.parametrize("batches", [False, True])
def test_message_queued_while_the_writer_is_suspended_then_close_is_still_written(batches):
    async def main():
        session = AgentSession("n1", batches=batches)
        out = session.outgoing()
        session.send(_ack(1))
        first = await out.__anext__()  # the writer is now suspended at its yield (gRPC write)
        session.send(_ack(2))  # queued before the close ...
        session.close()
        rest = [m async for m in out]
        return _seqs([first, *rest])

    assert asyncio.run(main()) == [1, 2]


def test_a_controller_batch_stays_under_the_grpc_message_limit():
    """256 assignments of 300 KiB each (a spec near max_task_bytes, or upstream outputs) queued
    in one turn must not become one 75 MiB message: the agent receives at most 64 MiB (and the
    controller sends at most max_message_bytes, 64 MiB by default)."""
    limit = 64 * 2**20

    async def main():
        session = AgentSession("n1", batches=True)
        out = session.outgoing()
        for i in range(256):
            spec = agent_pb2.AssignTask(ref=agent_pb2.AttemptRef(run_id="r", task=f"t{i}"))
            spec.upstream_outputs["up"] = "x" * (300 * 1024)
            session.send(agent_pb2.ControllerMessage(assign=spec))
        session.close()
        return [m.ByteSize() async for m in out]

    sizes = asyncio.run(main())
    assert max(sizes) <= limit, f"a stream message of {max(sizes)} bytes"
