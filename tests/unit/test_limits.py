"""Request limits and the bounded refusal messages that name them."""

from __future__ import annotations

import pytest
from config_helpers import controller_config

from tether.api.v1 import types_pb2 as t
from tether.controller.errors import _message, shorten
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.validation import LIMITS, Limits, validate_workflow


def _spec(*tasks: t.TaskSpec) -> t.WorkflowSpec:
    return t.WorkflowSpec(name="w", tasks=list(tasks))


def _problems(spec: t.WorkflowSpec, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidSpecError) as info:
        validate_workflow(spec, limits)
    return str(info.value)


def test_env_value_and_total_are_bounded():
    msg = _problems(_spec(t.TaskSpec(name="a", command=["x"], env={"K": "v" * 40_000})))
    assert "tasks[0] (a).env.K" in msg and "max_env_value_bytes" in msg
    env = {f"K{i}": "v" * 1000 for i in range(10)}
    msg = _problems(_spec(t.TaskSpec(name="a", command=["x"], env=env)), Limits(max_env_bytes=5000))
    assert "tasks[0] (a).env:" in msg and "max_env_bytes" in msg


def test_duration_nanos_out_of_range_are_refused():
    task = t.TaskSpec(name="a", command=["x"])
    task.timeout.nanos = 1_000_000_000
    assert "tasks[0] (a).timeout: nanos must be in 0..999999999" in _problems(_spec(task))
    task.timeout.nanos = 5
    task.backoff.max.nanos = -1
    assert "tasks[0] (a).backoff.max" in _problems(_spec(task))


def test_references_far_upstream_pass_and_others_are_named():
    tasks = [t.TaskSpec(name="t0", command=["x"])]
    for i in range(1, 200):
        tasks.append(
            t.TaskSpec(
                name=f"t{i}",
                command=["echo", "{{ tasks.t0.outputs }}", "{{ tasks.t1.outputs.k }}"]
                if i > 1
                else ["echo"],
                depends_on=[f"t{i - 1}"],
            )
        )
    validate_workflow(_spec(*tasks))
    side = t.TaskSpec(name="side", command=["echo", "{{ tasks.t5.outputs }}"], depends_on=["t0"])
    msg = _problems(_spec(*tasks, side))
    assert "tasks[200] (side).command[1]: task 't5' is not upstream of 'side'" in msg


def test_refusal_messages_are_short_and_count_the_rest():
    violations = [FieldViolation(f"tasks[{i}] ({'n' * 10_000}).name", "bad") for i in range(20_000)]
    msg = _message(InvalidSpecError(violations))
    assert len(msg) <= 4096
    assert msg.endswith("; and 19980 more problems")
    assert ").name: bad" in msg
    assert shorten("abcdef", 10) == "abcdef"
    assert len(shorten("x" * 1000, 50)) <= 50


def test_limit_flags_build_the_config():
    config = controller_config(
        "--max-message-bytes",
        "1Mi",
        "--max-spec-bytes",
        "512Ki",
        "--max-tasks-per-run",
        "10",
        "--max-id-length",
        "64",
    )
    assert config.max_message_bytes == 1 << 20 and config.limits.max_spec_bytes == 1 << 19
    assert config.limits.max_tasks == 10 and config.limits.max_id_length == 64
    assert config.limits.max_env_bytes == LIMITS.max_env_bytes
    with pytest.raises(ValueError, match="max_tasks must be > 0"):
        Limits(max_tasks=0)
