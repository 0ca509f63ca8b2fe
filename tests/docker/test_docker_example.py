"""The fraud-detection example, every task in a container, on two docker agents.

Users run it with ``image: python:3.12-slim``; no registry is reachable here, so the test runs
the same file with a Python image built from Debian's packages (tests/docker/build_images.sh).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from dockerutil import NODE_PREFIX

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud_detection.yaml"


def test_example_runs_in_containers(mesh, docker_api, python_image):
    data = yaml.safe_load(EXAMPLE.read_text())
    assert {task["image"] for task in data["tasks"]} == {"python:3.12-slim"}
    for task in data["tasks"]:
        task["image"] = python_image
        task["image_pull_policy"] = "never"
    for i in (1, 2):
        mesh.add_agent(f"{NODE_PREFIX}ex{i}", runtime="docker", cpu=2)
    since = int(time.time()) - 1
    final = mesh.client().submit(Workflow.from_dict(data)).wait(timeout=120)
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED, final.message
    tasks = {tk.spec.name: tk for tk in final.tasks}
    assert "6 of 406 transactions flagged as anomalous" in tasks["detect"].stdout_tail
    assert json.loads(tasks["detect"].outputs_json)["checked"] == 406
    # Each task ran in a container of its own (the engine's record of container starts).
    started = docker_api.events(
        since=since,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": "start", "label": f"tether.run={final.id}"},
    )
    assert sorted(e["Actor"]["Attributes"]["tether.task"] for e in started) == sorted(tasks)
