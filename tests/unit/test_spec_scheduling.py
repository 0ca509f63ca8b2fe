"""Scheduling fields of the spec: YAML and SDK forms, validation with field paths, the GPU
labels agents report."""

from __future__ import annotations

import pytest

from tether.agent.resources import detect_gpus, gpu_labels, gpu_model_label
from tether.controller.policies import POLICIES
from tether.sdk.constants import POLICY_NAMES
from tether.sdk.errors import InvalidSpecError
from tether.sdk.spec import Workflow

YAML = """
name: w
scheduling: {policy: spread}
tasks:
  - name: a
    command: ["true"]
    node_selector: {gpu-model: a100}
    affinity: ["zone In [z1, z2]", {key: ssd, operator: Exists, weight: 20}]
    priority: 80
    preemptible: true
    replicas: 2
    expected_duration: 10m
"""


def test_the_sdk_and_the_controller_know_the_same_policies():
    assert set(POLICY_NAMES) == set(POLICIES)


def test_yaml_fields_reach_the_api():
    spec = Workflow.from_yaml(YAML).to_proto()
    t = spec.tasks[0]
    assert spec.scheduling.policy == "spread"
    assert dict(t.node_selector) == {"gpu-model": "a100"}
    assert [(a.key, a.operator, list(a.values), a.weight) for a in t.affinity] == [
        ("zone", "In", ["z1", "z2"], 0),
        ("ssd", "Exists", [], 20),
    ]
    assert (t.priority, t.preemptible, t.replicas, t.expected_duration.seconds) == (
        80,
        True,
        2,
        600,
    )


def test_priority_unset_is_told_apart_from_zero():
    w = Workflow("w", policy="fifo")
    w.task("a", ["true"])
    w.task("b", ["true"], priority=0, affinity=["k DoesNotExist"])
    spec = w.to_proto()
    assert spec.scheduling.policy == "fifo"
    assert not spec.tasks[0].HasField("priority")
    assert spec.tasks[1].HasField("priority") and spec.tasks[1].priority == 0


@pytest.mark.parametrize(
    "old, new, path",
    [
        ("spread", "nope", "scheduling.policy"),
        ("priority: 80", "priority: 101", "tasks[0] (a).priority"),
        ("zone In", "zone Near", "tasks[0] (a).affinity"),
        ("replicas: 2", "replicas: -1", "tasks[0] (a).replicas"),
        ("operator: Exists", "operator: Exists, values: [x]", "tasks[0] (a).affinity[1].values"),
        ("operator: Exists", "operator: Near", "tasks[0] (a).affinity[1].operator"),
        ("weight: 20", "weight: 200", "tasks[0] (a).affinity[1].weight"),
        ("expected_duration: 10m", "expected_duration: 40d", "tasks[0] (a).expected_duration"),
        ("priority:", "prio:", "tasks[0] (a).prio"),
    ],
)
def test_bad_scheduling_fields_name_the_field(old, new, path):
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(YAML.replace(old, new)).to_proto()
    assert path in [v.field for v in e.value.violations]


@pytest.mark.parametrize(
    "model, label",
    [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("", ""),
    ],
)
def test_gpu_model_labels_are_short(model, label):
    assert gpu_model_label(model) == label


def test_fake_gpus_give_model_and_memory_labels():
    assert gpu_labels(detect_gpus("a100:40Gi,a100:40Gi")) == {
        "tether.io/gpu-model": "a100",
        "tether.io/gpu-memory": "40Gi",
    }
    assert gpu_labels([]) == {}
