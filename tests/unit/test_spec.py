"""The workflow format and its validation (no servers needed)."""

import pytest
from helpers import ROOT

from tether.api.v1 import types_pb2 as t
from tether.sdk import InvalidSpecError, Workflow
from tether.sdk.quantities import parse_duration, parse_memory
from tether.sdk.validation import validate_workflow


def spec(*tasks, name="wf"):
    return t.WorkflowSpec(name=name, tasks=list(tasks))


def task(name, deps=(), **kw):
    kw.setdefault("command", ["true"])
    return t.TaskSpec(name=name, depends_on=list(deps), **kw)


def violations(s):
    with pytest.raises(InvalidSpecError) as e:
        validate_workflow(s)
    return [str(v) for v in e.value.violations]


def test_quantities():
    assert parse_memory("512Mi") == 512 * 2**20
    assert parse_memory("2Gi") == 2 * 2**30
    assert parse_memory("1G") == 10**9
    assert parse_memory(1000) == 1000
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    for bad in ("lots", "-1Gi", "1Xi", ""):
        with pytest.raises(ValueError):
            parse_memory(bad)
    for bad in ("soon", "10", "1x", "s", "-5s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_valid_diamond_passes():
    validate_workflow(spec(task("a"), task("b", ["a"]), task("c", ["a"]), task("d", ["b", "c"])))


def test_cycle_names_task_and_path():
    v = violations(spec(task("a", ["c"]), task("b", ["a"]), task("c", ["b"])))
    assert len(v) == 1
    assert v[0].startswith("tasks[0] (a).depends_on: cycle: a -> c -> b -> a")


def test_unknown_dependency():
    v = violations(spec(task("a"), task("b", ["nope"])))
    assert v == ["tasks[1] (b).depends_on[0]: unknown task 'nope'"]


def test_duplicate_name():
    v = violations(spec(task("a"), task("a")))
    assert v == ["tasks[1] (a).name: duplicate task name (also tasks[0])"]


def test_negative_resources():
    v = violations(spec(task("a", resources=t.Resources(cpu=-1, memory_bytes=-5, gpu=-2))))
    assert "tasks[0] (a).resources.cpu: must be >= 0, got -1.0" in v
    assert any(x.startswith("tasks[0] (a).resources.memory:") for x in v)
    assert any(x.startswith("tasks[0] (a).resources.gpu:") for x in v)
    for cpu in (float("inf"), float("nan")):
        v = violations(spec(task("a", resources=t.Resources(cpu=cpu))))
        assert v == [f"tasks[0] (a).resources.cpu: must be a finite number, got {cpu}"]


def test_other_rules():
    assert violations(spec()) == ["tasks: a workflow needs at least one task"]
    assert violations(spec(task("a"), name=" ")) == ["name: must not be empty"]
    assert violations(spec(t.TaskSpec(name="a"))) == ["tasks[0] (a).command: must not be empty"]
    assert "tasks[0] (a).depends_on[0]: a task cannot depend on itself" in violations(
        spec(task("a", ["a"]))
    )
    assert violations(spec(task("bad name"))) == [
        "tasks[0] (bad name).name: use 1-63 letters, digits, '_', '.', '-', starting alphanumeric"
    ]
    assert violations(spec(task("a", retries=-1)))[0].startswith("tasks[0] (a).retries")
    assert violations(spec(task("a", env={"1X": "v"}))) == [
        "tasks[0] (a).env.1X: not a valid environment variable name"
    ]
    huge = task("a", command=["x" * (300 * 1024)])
    assert violations(spec(huge))[0].startswith("tasks[0] (a): task is")


YAML = """
name: demo
tasks:
  - name: a
    command: [echo, hi]
    resources: {cpu: 0.5, memory: 512Mi, gpu: 1}
    timeout: 30s
    retries: 2
    env: {N: 3, FLAG: true}
  - name: b
    command: [echo, b]
    depends_on: [a]
"""


def test_yaml_and_python_build_the_same_spec():
    from_yaml = Workflow.from_yaml(YAML).to_proto()
    wf = Workflow("demo")
    a = wf.task(
        "a",
        ["echo", "hi"],
        cpu=0.5,
        memory="512Mi",
        gpu=1,
        timeout="30s",
        retries=2,
        env={"N": "3", "FLAG": "true"},
    )
    wf.task("b", ["echo", "b"], depends_on=[a])
    assert wf.to_proto() == from_yaml
    a_spec = from_yaml.tasks[0]
    assert a_spec.resources.memory_bytes == 512 * 2**20
    assert a_spec.timeout.seconds == 30


def test_unknown_fields_are_errors():
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml("name: x\ntasks:\n  - name: a\n    command: [x]\n    retires: 2\n")
    assert str(e.value) == "tasks[0] (a).retires: unknown field (did you mean 'retries'?) (line 5)"
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml("name: x\nowner: me\ntasks: []\n")
    assert str(e.value) == "owner: unknown field (line 2)"  # nothing close: no guess
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml("name: x\ntasks:\n  - {name: a, command: [x], backoff: {intial: 1s}}\n")
    assert "tasks[0] (a).backoff.intial: unknown field (did you mean 'initial'?)" in str(e.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text("name: x\ntasks:\n  - {name: a, command: [x]\n")
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(f)
    assert str(e.value).startswith(f"{f}:4:1: not valid YAML") and "unicode" not in str(e.value)
    f.write_text("name: x\ntasks:\n  - name: a\n    command: [x]\n    resources: {memory: lots}\n")
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(f)
    assert str(e.value) == (
        f"tasks[0] (a).resources.memory: invalid memory quantity 'lots' (use e.g. 512Mi, 2Gi) "
        f"({f}:5)"
    )


def test_malformed_values_name_the_field():
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(
            "name: x\ntasks:\n  - name: a\n    command: [x]\n    resources: {memory: lots}\n"
        )
    assert str(e.value).startswith("tasks[0] (a).resources.memory: invalid memory quantity")
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml("name: x\ntasks:\n  - name: a\n    command: [x]\n    timeout: soon\n")
    assert str(e.value).startswith("tasks[0] (a).timeout: invalid duration")
    with pytest.raises(InvalidSpecError):
        Workflow.from_yaml("name: [unclosed\n")


def test_python_example_equals_yaml_example():
    import importlib.util

    root = ROOT
    spec_ = importlib.util.spec_from_file_location(
        "fraud", root / "examples" / "fraud_detection.py"
    )
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    from_yaml = Workflow.from_yaml(root / "examples" / "fraud_detection.yaml").to_proto()
    assert mod.build().to_proto() == from_yaml


def test_nul_bytes_are_rejected():
    v = violations(spec(task("a", command=["echo", "x\0y"], env={"A": "b\0"})))
    assert "tasks[0] (a).command[1]: must not contain a NUL byte" in v
    assert "tasks[0] (a).env.A: must not contain a NUL byte" in v


def test_state_enums_mirror_the_api_and_carry_names():
    from tether.api.v1 import types_pb2 as t
    from tether.sdk import RunState, TaskState

    assert {m.name: m.value for m in RunState} == {
        n.removeprefix("RUN_STATE_"): v for n, v in t.RunState.items()
    }
    assert {m.name: m.value for m in TaskState} == {
        n.removeprefix("TASK_STATE_"): v for n, v in t.TaskState.items()
    }
    run = t.Run(state=t.RunState.RUN_STATE_SUCCEEDED)
    assert RunState(run.state).name == "SUCCEEDED" and run.state == RunState.SUCCEEDED
    assert RunState.SUCCEEDED.terminal and not RunState.RUNNING.terminal
    assert TaskState(t.TaskState.TASK_STATE_LOST).name == "LOST" and not TaskState.LOST.terminal
