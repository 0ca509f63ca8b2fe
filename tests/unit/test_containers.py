"""What the docker runtime asks the engine for, checked without an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import LaunchSpec, RuntimeError_
from tether.agent.runtimes.containers import (
    container_name,
    create_args,
    device_requests,
    pull_policy,
)
from tether.agent.runtimes.docker import DockerRuntime


def spec(tmp_path: Path, **kw) -> LaunchSpec:
    d = tmp_path / "r1" / "train" / "2"
    base = dict(
        name="r1-train-2",
        command=["python3", "-c", "print(1)"],
        env={"A": "1", "TRACEPARENT": "00-x-y-01"},
        working_dir="",
        attempt_dir=d,
        stdout_path=d / "stdout.log",
        stderr_path=d / "stderr.log",
        image="python:3.12-slim",
        labels={"tether.run": "r1", "tether.task": "train", "tether.attempt": "2"},
    )
    return LaunchSpec(**(base | kw))


def test_container_mapping(tmp_path):
    container, host = create_args(
        spec(tmp_path, cpu=1.5, memory_bytes=2**30, log_limit_bytes=2**20), node="n1"
    )
    assert container["image"] == "python:3.12-slim"
    # The task's command is the program: it replaces the image's entrypoint.
    assert container["entrypoint"] == ["python3"]
    assert container["command"] == ["-c", "print(1)"]
    assert container["environment"] == {"A": "1", "TRACEPARENT": "00-x-y-01"}
    assert container["working_dir"] == "/tether"
    assert container["name"] == "tether-r1-train-2"
    assert container["labels"] == {
        "tether.run": "r1",
        "tether.task": "train",
        "tether.attempt": "2",
        "tether.managed": "true",
        "tether.node": "n1",
    }
    assert host["binds"] == {
        str(tmp_path / "r1" / "train" / "2"): {"bind": "/tether", "mode": "rw"}
    }
    assert host["nano_cpus"] == 1_500_000_000
    assert host["mem_limit"] == host["memswap_limit"] == 2**30
    assert host["init"] is True
    # The engine keeps a bounded copy (room for JSON framing); with no limit, all of it.
    assert host["log_config"]["Type"] == "json-file"
    assert int(host["log_config"]["Config"]["max-size"]) >= 16 * 2**20
    _, unlimited = create_args(spec(tmp_path, log_limit_bytes=0), "n1")
    assert unlimited["log_config"]["Config"] == {}
    assert "device_requests" not in host


def test_no_limits_when_the_task_asks_for_none_and_explicit_working_dir(tmp_path):
    container, host = create_args(spec(tmp_path, working_dir="/work"), "n1")
    assert container["working_dir"] == "/work"
    assert not {"nano_cpus", "mem_limit", "memswap_limit"} & set(host)


def test_gpus_become_one_nvidia_device_request_with_the_chosen_ids(tmp_path):
    assert device_requests([]) == []
    [req] = device_requests([0, 2])
    assert req["Driver"] == "nvidia"
    assert req["DeviceIDs"] == ["0", "2"]
    assert req["Capabilities"] == [["gpu"]]
    assert not req.get("Count"), "an engine refuses Count together with DeviceIDs"
    env = {"CUDA_VISIBLE_DEVICES": "0,2", "NVIDIA_VISIBLE_DEVICES": "0,2"}
    container, host = create_args(spec(tmp_path, gpu_indices=[0, 2], env=env), "n1")
    assert host["device_requests"] == [req]
    assert container["environment"] == env


def test_bad_specs_are_refused_before_reaching_the_engine(tmp_path):
    with pytest.raises(RuntimeError_) as e:
        create_args(spec(tmp_path, image=""), "n1")
    assert e.value.reason == "image"
    with pytest.raises(RuntimeError_):
        create_args(spec(tmp_path, command=[]), "n1")
    assert pull_policy(spec(tmp_path)) == "if-not-present"
    assert pull_policy(spec(tmp_path, image_pull_policy="always")) == "always"
    with pytest.raises(RuntimeError_):
        pull_policy(spec(tmp_path, image_pull_policy="sometimes"))


def test_container_names_are_valid_for_the_engine(tmp_path):
    assert container_name(spec(tmp_path, name="r1-a b/c-1")) == "tether-r1-a_b_c-1"


def test_task_paths_point_inside_the_attempt_mount(tmp_path):
    rt = DockerRuntime(AgentConfig(node="n1", runtime="docker", work_dir=tmp_path))
    d = layout.attempt_dir(tmp_path, "r1", "train", 2)
    assert rt.task_path(d / "output.json") == "/tether/output.json"
    assert rt.task_path(d / "sub" / "x") == "/tether/sub/x"
    with pytest.raises(ValueError):
        rt.task_path(tmp_path / "r1" / "elsewhere")
