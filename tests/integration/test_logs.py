"""Attempt logs end to end: kept on the agent's disk, streamed through the controller to the
SDK and the `tether logs` command, on real etcd, real gRPC and real subprocesses."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from dataclasses import replace

import grpc
import pytest
from helpers import PY, R, S, assert_one_line_error, py, tether

from tether.agent.runtimes.capped_log import truncation_note
from tether.api.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import free_port
from tether.controller.server import ControllerServer
from tether.sdk import Client, InvalidSpecError, NotFoundError, UnavailableError, Workflow


def joined(chunks) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    for c in chunks:
        out[c.stream] += c.data
    return out


def on_loop(mesh, fn):
    """Call ``fn`` on the mesh's event loop (where agents and controller change their state)."""

    async def call():
        return fn()

    return mesh.call(call())


def wait_on(marker) -> str:
    """Code that prints 'started', waits for ``marker`` to exist, prints 'finished'."""
    return (
        "import os, sys, time\n"
        "print('started', flush=True)\n"
        f"while not os.path.exists({str(marker)!r}): time.sleep(0.02)\n"
        "print('finished', flush=True)\n"
    )


class Reader:
    """Iterates a log stream in a thread, so the test can watch chunks arrive as they do."""

    END = object()

    def __init__(self, chunks) -> None:
        self.chunks = chunks
        self.items: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for c in self.chunks:
                self.items.put(c)
            self.items.put(self.END)
        except Exception as e:
            self.items.put(e)

    def next(self, timeout: float = 10):
        return self.items.get(timeout=timeout)

    def rest(self, timeout: float = 10) -> list:
        out = []
        while (item := self.next(timeout)) is not self.END:
            if isinstance(item, Exception):
                raise item
            out.append(item)
        return out


def test_logs_of_a_finished_attempt(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("logs")
    wf.task(
        "talk",
        py(
            "import sys\n"
            "print('hello out')\n"
            "print('hello err', file=sys.stderr)\n"
            "sys.stdout.write('x' * 200000)\n"
        ),
    )
    run = client.submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    chunks = list(run.logs("talk"))
    assert joined(chunks) == {"stdout": b"hello out\n" + b"x" * 200000, "stderr": b"hello err\n"}
    assert all(c.attempt == 1 and 0 < len(c.data) <= 64 * 1024 for c in chunks)
    assert joined(client.logs(run.id, "talk", attempt=1)) == joined(chunks)
    # Following an attempt that is over sends everything and ends.
    assert joined(run.logs("talk", follow=True)) == joined(chunks)

    res = tether("logs", run.id, "talk", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello out\n" + "x" * 200000 and res.stderr == "hello err\n"
    # A reader that goes away early (`| head -c1`) ends the command quietly.
    proc = subprocess.Popen(
        [PY, "-m", "tether.sdk.cli", "--controller", mesh.address, "logs", run.id, "talk"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(1) == b"h"
    proc.stdout.close()
    assert proc.wait(30) == 1
    assert proc.stderr.read() == b""  # no traceback, no complaint about the pipe


def test_follow_streams_output_while_the_task_runs_and_ends_with_it(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    marker = tmp_path / "go"
    wf = Workflow("follow")
    wf.task("slow", py(wait_on(marker)))
    run = client.submit(wf)
    # Asked at once, before the attempt has started: following waits for it.
    reader = Reader(run.logs("slow", follow=True))
    first = reader.next()
    assert first.stream == "stdout" and first.data == b"started\n" and first.attempt == 1
    assert run.status().tasks[0].state == S.TASK_STATE_RUNNING
    time.sleep(0.3)
    assert reader.items.empty(), "the stream stays open while the task runs"
    marker.touch()
    rest = reader.rest()
    assert joined([first, *rest])["stdout"] == b"started\nfinished\n"
    # The stream ended because the attempt did.
    mesh.wait_for(
        lambda: run.status().tasks[0].state == S.TASK_STATE_SUCCEEDED, 5, "task succeeded"
    )


def test_logs_of_an_earlier_attempt_after_a_retry(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    marker = tmp_path / "failed-once"
    wf = Workflow("retry-logs")
    wf.task(
        "flaky",
        py(
            "import os, sys\n"
            f"m = {str(marker)!r}\n"
            "if os.path.exists(m): print('second try')\n"
            "else:\n"
            "    open(m, 'w').close(); print('first try'); print('boom', file=sys.stderr)\n"
            "    sys.exit(1)\n"
        ),
        retries=1,
        backoff={"initial": "50ms", "jitter": 0},
    )
    run = client.submit(wf)
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED and final.tasks[0].attempt == 2
    first = list(run.logs("flaky", attempt=1))
    assert joined(first) == {"stdout": b"first try\n", "stderr": b"boom\n"}
    assert {c.attempt for c in first} == {1}
    current = list(run.logs("flaky"))
    assert joined(current) == {"stdout": b"second try\n", "stderr": b""}
    assert {c.attempt for c in current} == {2}
    with pytest.raises(NotFoundError, match="has no attempt 3"):
        list(run.logs("flaky", attempt=3))

    res = tether("logs", run.id, "flaky", "--attempt", "1", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    assert (res.stdout, res.stderr) == ("first try\n", "boom\n")
    res = tether("logs", run.id, "flaky", "--stderr-only", controller=mesh.address)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = tether("logs", run.id, "flaky", "--stdout-only", "-f", controller=mesh.address)
    assert (res.returncode, res.stdout, res.stderr) == (0, "second try\n", "")


def test_the_log_cap_truncates_and_the_task_still_finishes(mesh):
    mesh.add_agent("n1", log_limit_bytes=1000)
    wf = Workflow("cap")
    # 1 MB is far more than a pipe holds: the task only finishes if the agent keeps draining.
    wf.task("loud", py("import sys; print('small'); sys.stdout.write('y' * 1_000_000)"))
    run = mesh.client().submit(wf)
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED
    logs = joined(run.logs("loud"))
    assert logs["stdout"] == (b"small\n" + b"y" * 994 + truncation_note(1000))
    assert logs["stderr"] == b""
    stored = mesh.work_dir / "n1" / run.id / "loud" / "1" / "stdout.log"
    assert stored.stat().st_size == 1000 + len(truncation_note(1000))
    assert [e.kind for e in final.tasks[0].events] == ["log_truncated"]


def test_bad_requests_are_refused(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("errs")
    wf.task("done", py("print('hi')"))
    wf.task("huge", py("pass"), cpu=64)  # no node can hold it: it never starts
    run = client.submit(wf)
    mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_SUCCEEDED, 30, "done")
    with pytest.raises(NotFoundError, match="run 'nope' not found"):
        list(client.logs("nope", "done"))
    with pytest.raises(NotFoundError, match="task 'ghost' not found"):
        list(run.logs("ghost"))
    with pytest.raises(NotFoundError, match=r"has no attempt yet \(READY\)"):
        list(run.logs("huge"))
    with pytest.raises(NotFoundError, match="has no attempt 2"):
        list(run.logs("done", attempt=2))
    for kw, field in (
        ({"run_id": "", "task": "done"}, "run_id"),
        ({"run_id": run.id, "task": ""}, "task"),
        ({"run_id": run.id, "task": "done", "attempt": -1}, "attempt"),
    ):
        with pytest.raises(InvalidSpecError) as e:
            list(client.logs(**kw))
        assert [v.field for v in e.value.violations] == [""]  # details arrive as one message
        assert e.value.message.startswith(field + ":"), e.value.message
    assert_one_line_error(
        tether("logs", run.id, "ghost", controller=mesh.address), "task 'ghost' not found"
    )
    # One line even where the terminal is narrower than the message.
    res = subprocess.run(
        [PY, "-m", "tether.sdk.cli", "logs", run.id, "done", "--attempt", "9"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "30", "TETHER_CONTROLLER": mesh.address},
    )
    assert_one_line_error(res, f"task 'done' of run {run.id} has no attempt 9 (it has 1)")
    client.cancel(run.id)


def test_logs_whose_node_is_gone_are_unavailable(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("gone")
    wf.task("x", py("print('on n1')"))
    run = client.submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    assert joined(run.logs("x"))["stdout"] == b"on n1\n"
    mesh.stop_agent("n1")
    with pytest.raises(UnavailableError) as e:
        list(run.logs("x"))
    assert "node n1" in e.value.message and "controller unavailable" not in e.value.message
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason == "node_unavailable"
    res = tether("logs", run.id, "x", controller=mesh.address)
    assert_one_line_error(res, "node n1 is not connected")


def test_a_node_leaving_mid_stream_ends_it_unavailable(mesh, tmp_path):
    mesh.add_agent("n1")
    wf = Workflow("leaving")
    # Ignores SIGTERM, so the attempt outlives the agent's connection while it shuts down.
    wf.task(
        "stubborn",
        py(
            "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            + wait_on(tmp_path / "never")
        ),
    )
    run = mesh.client().submit(wf)
    reader = Reader(run.logs("stubborn", follow=True))
    assert reader.next().data == b"started\n"
    mesh.stop_agent("n1")
    with pytest.raises(UnavailableError, match="node n1 disconnected while sending logs"):
        reader.rest()


def test_a_client_going_away_stops_the_stream_on_the_agent(mesh, tmp_path):
    agent = mesh.add_agent("n1")
    marker = tmp_path / "go"
    wf = Workflow("bye")
    wf.task("slow", py(wait_on(marker)))
    run = mesh.client().submit(wf)
    chunks = run.logs("slow", follow=True)
    assert next(chunks).data == b"started\n"
    ids = on_loop(mesh, lambda: mesh.controller.logs.active)
    assert len(ids) == 1 and on_loop(mesh, lambda: agent.logs.active) == ids
    chunks.close()
    mesh.wait_for(lambda: not on_loop(mesh, lambda: agent.logs.active), 5, "the agent to stop")
    mesh.wait_for(lambda: not on_loop(mesh, lambda: mesh.controller.logs.active), 5, "drop")
    marker.touch()
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED


def test_a_client_that_falls_far_behind_is_cut_off(mesh):
    agent = mesh.add_agent("n1")
    wf = Workflow("firehose")
    wf.task("big", py("import sys; sys.stdout.write('z' * 16_000_000)"))
    run = mesh.client().submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    mesh.controller.logs.max_buffered_bytes = 256 * 1024
    with grpc.insecure_channel(mesh.address) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        call = stub.StreamLogs(controller_pb2.StreamLogsRequest(run_id=run.id, task="big"))
        time.sleep(1.0)  # not reading: everything the agent sends piles up on the controller
        received = 0
        with pytest.raises(grpc.RpcError) as e:
            for data in call:
                received += len(data.data)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert 0 < received < 16_000_000
    mesh.wait_for(lambda: not on_loop(mesh, lambda: agent.logs.active), 5, "the agent to stop")


def test_logs_of_a_finished_run_after_a_controller_restart(mesh):
    port = free_port()
    mesh.stop_controller()
    mesh.start_controller(listen=f"127.0.0.1:{port}")
    agent = mesh.add_agent("n1")
    wf = Workflow("old")
    wf.task("x", py("print('still here')"))
    run = mesh.client().submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    mesh.call(mesh.controller.engine.committer.flushed())
    mesh.stop_controller()
    mesh.start_controller(listen=f"127.0.0.1:{port}")
    assert run.id not in mesh.controller.engine.runs  # finished: read from etcd, not the cache
    registrations = agent.registrations
    mesh.wait_for(lambda: agent.registrations > registrations, 10, "the agent to reconnect")
    assert joined(mesh.client().logs(run.id, "x"))["stdout"] == b"still here\n"


def test_chunks_from_another_node_are_ignored(mesh, tmp_path):
    mesh.add_agent("n1")
    marker = tmp_path / "go"
    wf = Workflow("fenced")
    wf.task("slow", py(wait_on(marker)))
    run = mesh.client().submit(wf)
    reader = Reader(run.logs("slow", follow=True))
    assert reader.next().data == b"started\n"
    (stream_id,) = on_loop(mesh, lambda: mesh.controller.logs.active)
    # Another node answers that stream: with data and an eof. Neither reaches the client.
    out: queue.Queue = queue.Queue()
    out.put(
        agent_pb2.AgentMessage(
            register=agent_pb2.Register(node="intruder", capacity=t.Resources(cpu=1))
        )
    )
    out.put(
        agent_pb2.AgentMessage(
            log_chunk=agent_pb2.LogChunk(stream_id=stream_id, stream="stdout", data=b"forged")
        )
    )
    out.put(agent_pb2.AgentMessage(log_chunk=agent_pb2.LogChunk(stream_id=stream_id, eof=True)))
    with grpc.insecure_channel(mesh.address) as ch:
        replies = agent_pb2_grpc.AgentServiceStub(ch).Connect(iter(out.get, None))
        assert next(replies).WhichOneof("msg") == "registered"
        time.sleep(0.3)
        assert reader.items.empty(), "the stream neither got the forged data nor ended"
        out.put(None)
        replies.cancel()
    marker.touch()
    assert joined(reader.rest())["stdout"] == b"finished\n"


def test_with_a_standby_listed_first_logs_come_from_the_leader(mesh):
    """Clients rotate past a standby controller (not_leader), but not past a missing node."""
    standby = ControllerServer(replace(mesh.config, listen="127.0.0.1:0"))
    mesh.call(standby.start(wait_for_leadership=False))
    try:
        assert not standby.is_leader
        mesh.add_agent("n1")
        client = Client(f"{standby.address},{mesh.address}", timeout=10)
        wf = Workflow("ha")
        wf.task("x", py("print('from the leader')"))
        run = client.submit(wf)
        assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        client = Client(f"{standby.address},{mesh.address}", timeout=10)
        assert joined(client.logs(run.id, "x"))["stdout"] == b"from the leader\n"
        mesh.stop_agent("n1")
        # The leader says the node is away: asking the standby next would only hide that.
        for addresses in (f"{mesh.address},{standby.address}", f"{standby.address},{mesh.address}"):
            with pytest.raises(UnavailableError) as e:
                list(Client(addresses, timeout=10).logs(run.id, "x"))
            assert e.value.reason == "node_unavailable" and "node n1" in e.value.message
            assert_one_line_error(
                tether("logs", run.id, "x", controller=addresses), "node n1 is not connected"
            )
    finally:
        mesh.call(standby.stop(grace=0.5))
