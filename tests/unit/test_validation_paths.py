"""The shortcuts validation takes for big specs (plain tasks, no forward edge, params in the
same pass) reach the same verdicts as the full checks."""

import pytest

from tether.api.v1 import types_pb2 as t
from tether.sdk import InvalidSpecError, Workflow
from tether.sdk.validation import validate_params, validate_workflow


def spec(*tasks):
    return t.WorkflowSpec(name="wf", tasks=list(tasks))


def task(name, deps=(), command=("true",), **kw):
    return t.TaskSpec(name=name, depends_on=list(deps), command=list(command), **kw)


def violations(s, **kw):
    with pytest.raises(InvalidSpecError) as e:
        validate_workflow(s, **kw)
    return [str(v) for v in e.value.violations]


def test_a_cycle_through_a_duplicate_name_is_found_without_a_forward_edge():
    # Every edge points to an earlier task, but the duplicate "a" closes a -> b -> a.
    v = violations(spec(task("a"), task("b", ["a"]), task("a", ["b"])))
    assert v == [
        "tasks[2] (a).name: duplicate task name (also tasks[0])",
        "tasks[0] (a).depends_on: cycle: a -> b -> a",
    ]


def test_a_duplicate_depending_on_its_own_name_is_named():
    v = violations(spec(task("a"), task("a", ["a"])))
    assert "tasks[1] (a).depends_on[0]: a task cannot depend on itself" in v


def test_plain_tasks_with_bad_commands_are_checked_in_full():
    # 20,000 two-byte characters fit in 64 KiB: only the first two are refused.
    v = violations(
        spec(task("a", command=["a\0b"]), task("b", command=[""]), task("c", command=["é" * 20000]))
    )
    assert v == [
        "tasks[0] (a).command[0]: must not contain a NUL byte",
        "tasks[1] (b).command[0]: the program must not be empty",
    ]


def test_a_long_argument_of_a_plain_task_is_refused():
    v = violations(spec(task("a", command=["é" * 40000])))
    assert v == ["tasks[0] (a).command[0]: 80000 bytes; at most 65536 (limit max_arg_bytes)"]


def test_a_template_in_a_plain_task_is_checked():
    v = violations(spec(task("a"), task("b", command=["{{ tasks.c.outputs }}"]), task("c")))
    assert v == ["tasks[1] (b).command[0]: task 'c' is not upstream of 'b'; add it to depends_on"]


def test_params_are_checked_in_the_same_pass_and_only_for_a_valid_spec():
    good = spec(task("a", command=["echo", "{{ params.x }}"], env={"Y": "{{ params.y }}"}))
    validate_workflow(good, params={"x": "1", "y": "2"})
    assert violations(good, params={"x": "1"}) == [
        "tasks[0] (a).env.Y: parameter 'y' was not given"
    ]
    with pytest.raises(InvalidSpecError):
        validate_params(good, {})
    # A bad spec reports its own problems, not the missing parameters.
    bad = spec(task("a", command=["echo", "{{ params.x }}"], retries=-1))
    assert violations(bad, params={}) == ["tasks[0] (a).retries: must be in 0..100, got -1"]


def test_a_long_depends_on_is_not_counted_in_the_task_size():
    names = [f"t{i:05d}" for i in range(40000)]  # about 320 KiB of names
    validate_workflow(spec(*(task(n) for n in names), task("join", names)))


def test_workflow_sends_only_the_fields_it_sets():
    wf = Workflow("wf")
    a = wf.task("a", ["true"], cpu=0, retries=0, timeout=0)
    wf.task("b", ["true"], depends_on=[a], memory="1Gi", priority=0)
    a_msg, b_msg = wf.to_proto().tasks
    assert [f.name for f, _ in a_msg.ListFields()] == ["name", "command"]
    assert b_msg.resources.memory_bytes == 2**30 and b_msg.HasField("priority")
    assert list(b_msg.depends_on) == ["a"]


def test_workflow_task_still_checks_arguments_equal_to_a_default_in_another_type():
    wf = Workflow("wf")
    with pytest.raises(InvalidSpecError) as e:
        wf.task("a", ["true"], cpu="", retries="many")
    fields = sorted(v.field for v in e.value.violations)
    assert fields == ["tasks[0] (a).resources.cpu", "tasks[0] (a).retries"]


@pytest.mark.parametrize("command", ["echo hi", b"echo hi"])
def test_workflow_task_refuses_a_string_command(command):
    wf = Workflow("wf")
    wf.task("first", ["true"])
    with pytest.raises(InvalidSpecError) as e:
        wf.task("a", command)
    assert [str(v) for v in e.value.violations] == [
        "tasks[1] (a).command: Input should be a valid list"
    ]
    assert len(wf.tasks) == 1


def test_workflow_task_takes_any_sequence_of_strings_as_command():
    wf = Workflow("wf")
    assert wf.task("a", ("echo", "hi")).command == ["echo", "hi"]
    assert wf.task("b", (x for x in ["true"])).command == ["true"]


def test_a_name_used_twice_in_one_field_is_reported_once():
    twice = "{{ params.x }}/{{ params.x }}/{{ tasks.c.outputs.a }}-{{ tasks.c.outputs.b }}"
    v = violations(spec(task("a", command=["echo", twice]), task("c")), params={})
    assert v == ["tasks[0] (a).command[1]: task 'c' is not upstream of 'a'; add it to depends_on"]
    good = spec(task("c"), task("a", ["c"], command=["echo", twice]))
    assert violations(good, params={}) == ["tasks[1] (a).command[1]: parameter 'x' was not given"]
