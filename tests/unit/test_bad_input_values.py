"""Bad input values (found by a platform-engineer review of the README): numbers the API
cannot hold, non-finite durations and capacities, NUL bytes, control characters, unknown
log levels. The rule: a clear error naming the field or option, never a traceback or bad
state."""

from __future__ import annotations

import math

import pytest
from config_helpers import agent_config, controller_config
from helpers import tether

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk import Client, InvalidSpecError, Workflow
from tether.sdk.quantities import parse_duration
from tether.sdk.settings import ConfigError
from tether.sdk.validation import validate_workflow

_NOWHERE = "127.0.0.1:1"  # nothing listens: every case must be refused before a call


# --- SDK: values a protobuf field cannot hold -----------------------------------------------
# pydantic accepts any Python int/float; Task._proto_fields then hands them to protobuf
# (ValueError: Value out of range) or sdk/spec.py:_duration (OverflowError / ValueError on
# inf and nan), before validate_workflow runs.

_OUT_OF_RANGE = [
    ({"retries": 10**20}, "retries"),
    ({"priority": 10**20}, "priority"),
    ({"replicas": 10**20}, "replicas"),
    ({"gpu": 10**12}, "resources.gpu"),
    ({"memory": "9999999Ti"}, "resources.memory"),
    ({"timeout": math.inf}, "timeout"),
    ({"timeout": math.nan}, "timeout"),
    ({"timeout": 1e300}, "timeout"),
    ({"expected_duration": math.inf}, "expected_duration"),
    ({"backoff": {"max": 1e300}}, "backoff.max"),
]


@pytest.mark.parametrize(("kwargs", "field"), _OUT_OF_RANGE)
def test_sdk_to_proto_refuses_values_protobuf_cannot_hold(kwargs, field):
    wf = Workflow("w")
    with pytest.raises(InvalidSpecError) as e:  # not ValueError / OverflowError
        wf.task("a", ["true"], **kwargs)
        wf.to_proto()
    assert any(field in v.field for v in e.value.violations), e.value.violations


@pytest.mark.parametrize(("kwargs", "field"), _OUT_OF_RANGE)
def test_sdk_submit_refuses_values_protobuf_cannot_hold(kwargs, field):
    with pytest.raises(InvalidSpecError):
        wf = Workflow("w")
        wf.task("a", ["true"], **kwargs)
        with Client(_NOWHERE) as client:
            client.submit(wf)


def test_sdk_workflow_timeout_must_be_finite():
    with pytest.raises(InvalidSpecError):
        wf = Workflow("w", timeout=math.inf)
        wf.task("a", ["true"])
        wf.to_proto()


@pytest.mark.parametrize(
    "line",
    [
        "retries: 100000000000000000000",
        "priority: 100000000000000000000",
        "resources: {memory: 99999999Ti}",
        "timeout: .inf",
        "timeout: .nan",
        "backoff: {max: 1.0e+300}",
    ],
)
def test_cli_submit_out_of_range_value_is_one_line_not_a_traceback(tmp_path, line):
    f = tmp_path / "wf.yaml"
    f.write_text(f"name: w\ntasks:\n  - name: a\n    command: ['true']\n    {line}\n")
    res = tether("submit", str(f), controller=_NOWHERE)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr, res.stderr[-800:]
    err = res.stderr.strip()
    assert err.startswith("error: tasks[0] (a).") and len(err.splitlines()) == 1, err


# --- durations: parse_duration lets nan and inf through --------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_parse_duration_refuses_non_finite_numbers(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "line",
    ["cancel_grace: .nan", "etcd_compaction_interval: .nan", "retention: .nan", "etcd_wait: .inf"],
)
def test_controller_config_file_refuses_non_finite_durations(tmp_path, line):
    # Once accepted: with `cancel_grace: .nan` the controller starts, and every CancelRun of
    # a running task then fails INTERNAL in dispatch.cancel (int(nan * 1e9)), leaving the
    # run RUNNING with its tasks running on (reproduced on a local mesh).
    conf = tmp_path / "c.yaml"
    conf.write_text(f"{line}\n")
    with pytest.raises(ConfigError, match=line.split(":")[0]):
        controller_config("--config", str(conf))


# --- controller config: max_message_bytes ---------------------------------------------------


def test_controller_refuses_a_max_message_size_no_request_fits():
    # Once accepted: the controller served, and `tether status` then fails with
    # "SERVER: Received message larger than max (2 vs. 0)".
    with pytest.raises(ConfigError, match="max_message_bytes"):
        controller_config("--max-message-bytes", "0")


# --- agent: --cpu nan / inf -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_agent_refuses_non_finite_cpu(value):
    # Once accepted by AgentConfig: Agent.__init__ died with a traceback in
    # int(cpu * 2); with --max-tasks set the agent registers a capacity of nan.
    with pytest.raises(ConfigError, match="cpu"):
        agent_config("--name", "n1", "--cpu", value)


@pytest.mark.parametrize("cpu", [math.nan, math.inf])
def test_controller_refuses_a_registration_with_non_finite_capacity(cpu):
    from tether.controller.service import _check_register

    reg = agent_pb2.Register(node="n1", capacity=t.Resources(cpu=cpu))
    assert "capacity" in _check_register(reg)


# --- spec: NUL bytes outside command and env -------------------------------------------------


@pytest.mark.parametrize("field", ["working_dir", "image"])
def test_nul_byte_in_working_dir_or_image_is_refused_at_submit(field):
    # command and env refuse NUL; working_dir is accepted and the attempt then fails at start
    # with "cannot start 'true': embedded null byte".
    spec = t.WorkflowSpec(name="w")
    spec.tasks.add(name="a", command=["true"], **{field: "a\x00b"})
    with pytest.raises(InvalidSpecError, match=field):
        validate_workflow(spec)


# --- log level ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["controller", "agent"])
def test_an_unknown_log_level_is_refused_not_ignored(command):
    res = tether(command, "--log-level", "nope", timeout=30)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--log-level" in res.stderr and "debug" in res.stderr, res.stderr


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "esc\x1b[31m"])
def test_a_workflow_name_with_control_characters_is_refused(name):
    spec = t.WorkflowSpec(name=name)
    spec.tasks.add(name="a", command=["true"])
    with pytest.raises(InvalidSpecError, match="name"):
        validate_workflow(spec)


def test_a_workflow_name_in_any_script_is_fine():
    spec = t.WorkflowSpec(name="détection-欺诈 ✓")
    spec.tasks.add(name="a", command=["true"])
    validate_workflow(spec)


@pytest.mark.parametrize("deadline", [math.inf, math.nan, -1])
def test_drain_deadline_must_be_a_finite_duration(deadline):
    with Client(_NOWHERE) as client, pytest.raises(InvalidSpecError, match="deadline"):
        client.drain_node("n1", deadline=deadline)


def test_setting_errors_name_the_setting_once_and_point_from_a_flags_name(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("limits: {max_tasks: 0}\n")
    with pytest.raises(ConfigError) as e:
        controller_config("--config", str(conf))
    assert str(e.value).count("limits:") == 1, e.value
    conf.write_text("name: gpu-1\n")
    with pytest.raises(ConfigError, match="did you mean 'node'"):
        agent_config("--config", str(conf))
    res = tether("status", "--controller", "127.0.0.1", timeout=30)
    assert res.returncode == 1 and res.stderr.count("controller") == 1, res.stderr
