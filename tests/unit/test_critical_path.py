"""Remaining critical paths of a DAG, and how the placer ranks a run's tasks from declared
and learned durations."""

from __future__ import annotations

from tether.api.v1 import types_pb2 as t
from tether.controller.critical_path import DEFAULT_SECONDS, remaining_paths
from tether.controller.placement import run_ranks
from tether.controller.records import RunEntry, TaskEntry


def test_a_chain_beside_short_tasks():
    durations = {"c1": 2.0, "c2": 2.0, "c3": 2.0, "s1": 1.0, "s2": 1.0}
    deps = {"c2": ["c1"], "c3": ["c2"]}
    assert remaining_paths(durations, deps) == {
        "c1": 6.0,
        "c2": 4.0,
        "c3": 2.0,
        "s1": 1.0,
        "s2": 1.0,
    }


def test_a_diamond_takes_the_longer_branch():
    durations = {"a": 1.0, "b": 5.0, "c": 1.0, "d": 1.0}
    deps = {"b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert remaining_paths(durations, deps)["a"] == 7.0


def test_declared_then_learned_then_the_default():
    run = RunEntry("k", t.Run(id="r", workflow_name="wf"), 0)
    specs = [
        t.TaskSpec(name="declared", expected_duration={"seconds": 3}),
        t.TaskSpec(name="learned"),
        t.TaskSpec(name="unknown", depends_on=["declared"]),
    ]
    for s in specs:
        run.tasks[s.name] = TaskEntry(s.name, t.TaskRun(run_id="r", spec=s), 0)
    assert run_ranks(run, {"learned": 9.0}) == {
        "declared": 3.0 + DEFAULT_SECONDS,
        "learned": 9.0,
        "unknown": DEFAULT_SECONDS,
    }
