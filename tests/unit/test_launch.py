"""The pure launch step: what an attempt is given (files, environment, labels, LaunchSpec)
and how its output file is judged. No runtime, no event loop."""

from __future__ import annotations

import json
import os
from pathlib import PurePosixPath

import pytest
from google.protobuf import duration_pb2

from tether.agent import launch, layout
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t

S = t.TaskState
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def assign(gpus: tuple[int, ...] = (), timeout: float = 0, **spec_kw) -> agent_pb2.AssignTask:
    spec = t.TaskSpec(name="train", command=["python", "-c", "pass"], **spec_kw)
    if timeout:
        spec.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout), nanos=500_000_000))
    return agent_pb2.AssignTask(
        ref=agent_pb2.AttemptRef(run_id="run1", task="train", attempt=3),
        spec=spec,
        params={"lr": "0.1"},
        upstream_outputs={"prep": json.dumps({"rows": 5}), "empty": ""},
        gpu_indices=list(gpus),
    )


def in_container(host: str) -> str:
    return str(PurePosixPath("/tether") / PurePosixPath(host).name)


def test_env_has_the_spec_env_tether_vars_and_traceparent(tmp_path):
    a = assign(env={"FOO": "bar", "TETHER_TASK": "overridden"})
    env = launch.task_env(a, tmp_path, TP, str)
    assert env["FOO"] == "bar"
    assert env["TETHER_RUN_ID"] == "run1"
    assert env["TETHER_TASK"] == "train"  # tether's own variables win over the spec's
    assert env["TETHER_ATTEMPT"] == "3"
    assert env["TETHER_OUTPUT_FILE"] == str(tmp_path / layout.OUTPUT_FILE)
    assert env["TETHER_INPUTS_FILE"] == str(tmp_path / layout.INPUTS_FILE)
    assert env["TRACEPARENT"] == TP
    assert "CUDA_VISIBLE_DEVICES" not in env and "NVIDIA_VISIBLE_DEVICES" not in env


def test_env_paths_are_the_ones_the_task_sees(tmp_path):
    env = launch.task_env(assign(), tmp_path, TP, in_container)
    assert env["TETHER_OUTPUT_FILE"] == "/tether/" + layout.OUTPUT_FILE
    assert env["TETHER_INPUTS_FILE"] == "/tether/" + layout.INPUTS_FILE


def test_gpu_tasks_see_only_their_devices(tmp_path):
    env = launch.task_env(assign(gpus=(1, 3)), tmp_path, TP, str)
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == "1,3"


def test_labels_name_the_attempt_node_trace_and_timeout():
    labels = launch.labels_of(assign(timeout=2.5), "n1", TP)
    assert labels == {
        layout.RUN_LABEL: "run1",
        layout.TASK_LABEL: "train",
        layout.ATTEMPT_LABEL: "3",
        layout.NODE_LABEL: "n1",
        layout.TRACEPARENT_LABEL: TP,
        layout.TIMEOUT_LABEL: "2.5",
    }
    assert layout.TIMEOUT_LABEL not in launch.labels_of(assign(), "n1", TP)


def test_launch_spec_paths_and_resources(tmp_path):
    a = assign(
        gpus=(0,),
        image="python:3.12",
        working_dir="/src",
        resources=t.Resources(cpu=1.5, memory_bytes=2**30),
        image_pull_policy="always",
    )
    events = []
    spec = launch.launch_spec(
        a,
        tmp_path,
        node="n1",
        traceparent=TP,
        task_path=str,
        log_limit_bytes=1024,
        on_event=lambda kind, msg: events.append((kind, msg)),
    )
    assert spec.name == "run1-train-3"
    assert spec.command == ["python", "-c", "pass"]
    assert os.fspath(spec.attempt_dir) == str(tmp_path)
    assert os.fspath(spec.stdout_path) == str(tmp_path / layout.STDOUT_FILE)
    assert os.fspath(spec.stderr_path) == str(tmp_path / layout.STDERR_FILE)
    assert (spec.image, spec.working_dir, spec.image_pull_policy) == (
        "python:3.12",
        "/src",
        "always",
    )
    assert (spec.cpu, spec.memory_bytes, spec.gpu_indices) == (1.5, 2**30, [0])
    assert spec.log_limit_bytes == 1024
    assert spec.env == launch.task_env(a, tmp_path, TP, str)
    assert spec.labels == launch.labels_of(a, "n1", TP)
    spec.on_event("pull", "pulling")
    assert events == [("pull", "pulling")]


def test_attempt_dir_is_derived_from_the_labels(tmp_path):
    d = layout.attempt_dir(tmp_path, "run1", "train", 3)
    assert d == tmp_path.absolute() / "run1" / "train" / "3"


def test_timeout_of():
    assert launch.timeout_of(assign(timeout=2.5).spec) == 2.5
    assert launch.timeout_of(assign().spec) == 0


def test_stage_writes_inputs_and_removes_stale_results(tmp_path):
    d = tmp_path / "run1" / "train" / "3"
    d.mkdir(parents=True)
    (d / layout.OUTPUT_FILE).write_text("{}")
    (d / layout.STATUS_FILE).write_bytes(b"old")
    (d / layout.STDOUT_FILE).write_text("an earlier try's")
    (d / layout.STDERR_FILE).write_text("an earlier try's")
    launch.stage(d, assign())
    assert json.loads((d / layout.INPUTS_FILE).read_text()) == {
        "params": {"lr": "0.1"},
        "tasks": {"prep": {"rows": 5}, "empty": None},
    }
    assert not (d / layout.OUTPUT_FILE).exists() and not (d / layout.STATUS_FILE).exists()
    # Logs are created by a try's first output: an earlier try's must not pass for this one's.
    assert not (d / layout.STDOUT_FILE).exists() and not (d / layout.STDERR_FILE).exists()
    # A new run, a new task of an existing run, and a new attempt of an existing task.
    for new in (("r2", "a", "1"), ("r2", "b", "1"), ("r2", "b", "2")):
        launch.stage(tmp_path.joinpath(*new), assign())
        assert tmp_path.joinpath(*new, layout.INPUTS_FILE).exists()


@pytest.mark.parametrize(
    ("content", "state", "reason", "outputs"),
    [
        (None, S.TASK_STATE_SUCCEEDED, "", ""),
        ('{"a": 1}', S.TASK_STATE_SUCCEEDED, "", '{"a": 1}'),
        ("", S.TASK_STATE_SUCCEEDED, "", ""),
        ("not json", S.TASK_STATE_FAILED, "output", ""),
        ('"' + "x" * launch.MAX_OUTPUT_BYTES + '"', S.TASK_STATE_FAILED, "output", ""),
    ],
)
def test_read_output(tmp_path, content, state, reason, outputs):
    path = tmp_path / layout.OUTPUT_FILE
    if content is not None:
        path.write_text(content)
    status = agent_pb2.TaskStatus()
    launch.read_output(path, status)
    assert (status.state, status.reason, status.outputs_json) == (state, reason, outputs)


def test_tail_keeps_the_end_of_a_log(tmp_path):
    log = tmp_path / "stdout.log"
    log.write_text("a" * 10 + "b" * launch.TAIL_BYTES)
    assert launch.tail(log) == "b" * launch.TAIL_BYTES
    assert launch.tail(tmp_path / "missing.log") == ""
