"""Files of an attempt directory, where the task may have put a link or a FIFO in a file's
place (a container writes there as another user): the agent never follows the link nor
waits on the FIFO, and reads at most what it keeps."""

from __future__ import annotations

import errno
import os

import pytest

from tether.agent import launch, layout
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t


@pytest.fixture
def host_secret(tmp_path):
    secret = tmp_path / "host-secret.json"
    secret.write_text('{"password": "hunter2"}')
    return secret


def test_a_link_in_a_files_place_is_not_followed(tmp_path, host_secret):
    d = tmp_path / "attempt"
    d.mkdir()
    for name in ("output.json", "stdout.log"):
        (d / name).symlink_to(host_secret)
    status = agent_pb2.TaskStatus()
    launch.read_output(d / "output.json", status)
    assert status.state == t.TaskState.TASK_STATE_FAILED and status.reason == "output"
    assert "not a regular file" in status.message and not status.outputs_json
    assert launch.tail(d / "stdout.log") == ""
    with pytest.raises(OSError) as e:
        layout.open_task_file(d / "stdout.log", "r")
    assert e.value.errno == errno.ELOOP


def test_writing_a_log_replaces_a_link_rather_than_writing_through_it(tmp_path, host_secret):
    d = tmp_path / "attempt"
    d.mkdir()
    (d / "stderr.log").symlink_to(host_secret)
    with layout.open_task_file(d / "stderr.log", "w") as f:
        f.write(b"ours")
    assert host_secret.read_text() == '{"password": "hunter2"}'
    assert not (d / "stderr.log").is_symlink() and (d / "stderr.log").read_bytes() == b"ours"
    (d / "stdout.log").symlink_to(host_secret)
    with pytest.raises(OSError):
        layout.open_task_file(d / "stdout.log", "a")
    assert host_secret.read_text() == '{"password": "hunter2"}'


def test_a_fifo_in_a_files_place_does_not_block(tmp_path):
    d = tmp_path / "attempt"
    d.mkdir()
    os.mkfifo(d / "output.json")
    os.mkfifo(d / "stdout.log")
    status = agent_pb2.TaskStatus()
    launch.read_output(d / "output.json", status)  # returns at once (a blocking open hangs)
    assert status.state == t.TaskState.TASK_STATE_FAILED and status.reason == "output"
    assert launch.tail(d / "stdout.log") == ""


def test_an_output_file_is_read_no_further_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "MAX_OUTPUT_BYTES", 10)
    out = tmp_path / "output.json"
    out.write_text('"' + "x" * 20 + '"')
    status = agent_pb2.TaskStatus()
    launch.read_output(out, status)
    assert status.state == t.TaskState.TASK_STATE_FAILED and "over 10 bytes" in status.message
    out.write_text('"ok"')
    status = agent_pb2.TaskStatus()
    launch.read_output(out, status)
    assert status.state == t.TaskState.TASK_STATE_SUCCEEDED and status.outputs_json == '"ok"'
