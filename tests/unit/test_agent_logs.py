"""The agent's side of log streaming: attempt files on disk become LogChunk messages."""

from __future__ import annotations

import asyncio

from helpers import eventually

from tether.agent.logs import CHUNK_BYTES, LogStreams
from tether.api.v1 import agent_pb2

REF = agent_pb2.AttemptRef(run_id="r1", task="t", attempt=2)


def _attempt_dir(tmp_path, stdout: bytes = b"", stderr: bytes = b""):
    d = tmp_path / "r1" / "t" / "2"
    d.mkdir(parents=True)
    (d / "stdout.log").write_bytes(stdout)
    (d / "stderr.log").write_bytes(stderr)
    return d


async def _collect(outbox: asyncio.Queue, timeout: float = 5) -> list[agent_pb2.LogChunk]:
    chunks = []
    while True:
        msg = await asyncio.wait_for(outbox.get(), timeout)
        chunks.append(msg.log_chunk)
        if msg.log_chunk.eof:
            return chunks


def _joined(chunks, stream: str) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


def test_sends_both_files_in_chunks_then_eof(tmp_path):
    big = bytes(range(256)) * 1000  # 256 000 bytes: four chunks
    _attempt_dir(tmp_path, big, b"oops\n")

    async def main():
        streams = LogStreams(tmp_path, lambda ref: False, "n1")
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="s1", ref=REF), outbox)
        chunks = await _collect(outbox)
        await asyncio.sleep(0)
        return chunks, streams.active

    chunks, active = asyncio.run(main())
    assert all(c.stream_id == "s1" for c in chunks)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert _joined(chunks, "stdout") == big and _joined(chunks, "stderr") == b"oops\n"
    assert chunks[-1].eof and not chunks[-1].error and not chunks[-1].data
    assert sum(c.eof for c in chunks) == 1
    assert active == set()


def test_follow_tails_until_the_attempt_is_over(tmp_path):
    d = _attempt_dir(tmp_path, b"one\n")
    running = {True}

    async def main():
        streams = LogStreams(tmp_path, lambda ref: True in running, "n1", poll_interval=0.01)
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="s", ref=REF, follow=True), outbox)
        first = (await asyncio.wait_for(outbox.get(), 5)).log_chunk
        with open(d / "stdout.log", "ab") as f:
            f.write(b"two\n")
        second = (await asyncio.wait_for(outbox.get(), 5)).log_chunk
        await asyncio.sleep(0.05)
        assert outbox.empty(), "no eof while the attempt runs"
        # The last output lands just before the attempt ends; it is still sent.
        with open(d / "stderr.log", "ab") as f:
            f.write(b"bye\n")
        running.clear()
        rest = await _collect(outbox)
        return [first, second, *rest]

    chunks = asyncio.run(main())
    assert [(c.stream, c.data) for c in chunks[:2]] == [("stdout", b"one\n"), ("stdout", b"two\n")]
    assert _joined(chunks, "stderr") == b"bye\n" and chunks[-1].eof and not chunks[-1].error


def test_unknown_attempt_or_bad_ref_ends_with_an_error(tmp_path):
    async def ask(ref):
        streams = LogStreams(tmp_path, lambda r: False, "n1")
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="x", ref=ref, follow=True), outbox)
        return await _collect(outbox)

    (chunk,) = asyncio.run(ask(REF))
    assert chunk.eof and "no logs of attempt 2 of task 't' (run r1) on node n1" in chunk.error
    for bad in (
        agent_pb2.AttemptRef(run_id="..", task="t", attempt=1),
        agent_pb2.AttemptRef(run_id="r1", task="a/b", attempt=1),
        agent_pb2.AttemptRef(run_id="r1", task="t", attempt=0),
    ):
        (chunk,) = asyncio.run(ask(bad))
        assert chunk.eof and chunk.error


def test_a_starting_attempt_without_files_yet_is_not_an_error(tmp_path):
    async def main():
        streams = LogStreams(tmp_path, lambda r: True, "n1")
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="x", ref=REF), outbox)
        return await _collect(outbox)

    (chunk,) = asyncio.run(main())
    assert chunk.eof and not chunk.error


def test_cancel_stops_a_followed_stream(tmp_path):
    _attempt_dir(tmp_path, b"x")

    async def main():
        streams = LogStreams(tmp_path, lambda r: True, "n1", poll_interval=0.01)
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="a", ref=REF, follow=True), outbox)
        streams.start(agent_pb2.LogRequest(stream_id="b", ref=REF, follow=True), outbox)
        await eventually(lambda: streams.active == {"a", "b"})
        assert streams.active == {"a", "b"}
        streams.cancel("a")
        streams.cancel("unknown")
        await eventually(lambda: streams.active == {"b"})
        assert streams.active == {"b"}
        streams.cancel_all()
        await eventually(lambda: not streams.active)
        return streams.active

    assert asyncio.run(main()) == set()


def test_a_busy_stdout_does_not_hold_up_stderr(tmp_path):
    _attempt_dir(tmp_path, b"o" * (2 * 2**20), b"err\n")

    async def main():
        streams = LogStreams(tmp_path, lambda r: False, "n1")
        outbox: asyncio.Queue = asyncio.Queue()
        streams.start(agent_pb2.LogRequest(stream_id="x", ref=REF, follow=True), outbox)
        return await _collect(outbox)

    chunks = asyncio.run(main())
    first_err = next(i for i, c in enumerate(chunks) if c.stream == "stderr")
    assert first_err <= 4, "stderr comes within a turn, not after 2 MiB of stdout"
    assert _joined(chunks, "stdout") == b"o" * (2 * 2**20) and _joined(chunks, "stderr") == b"err\n"
