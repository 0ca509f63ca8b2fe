"""The agent's side of secrets: values only in the task's environment, masked in reports."""

from __future__ import annotations

from tether.agent import launch, layout
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _assign() -> agent_pb2.AssignTask:
    return agent_pb2.AssignTask(
        ref=agent_pb2.AttemptRef(run_id="run1", task="call", attempt=1),
        spec=t.TaskSpec(
            name="call", command=["true"], env={"MODE": "x"}, env_secrets={"API_KEY": "k"}
        ),
        params={"p": "1"},
        secret_env={"API_KEY": "value-of-k"},
    )


def test_secret_value_is_in_the_env_and_not_in_the_attempt_dir(tmp_path):
    a = _assign()
    launch.stage(tmp_path, a)
    env = launch.task_env(a, tmp_path, TP, str)
    assert env["API_KEY"] == "value-of-k"
    assert env["MODE"] == "x"
    spec = launch.launch_spec(
        a, tmp_path, node="n1", traceparent=TP, task_path=str, log_limit_bytes=0
    )
    assert "value-of-k" not in repr(spec.labels)
    for f in tmp_path.iterdir():
        assert b"value-of-k" not in f.read_bytes(), f
    assert (tmp_path / layout.INPUTS_FILE).exists()


def test_tether_variables_win_over_a_secret_of_the_same_name(tmp_path):
    a = _assign()
    a.secret_env["TETHER_TASK"] = "spoofed"
    assert launch.task_env(a, tmp_path, TP, str)["TETHER_TASK"] == "call"


def test_redact_masks_values_in_tails_and_message():
    s = agent_pb2.TaskStatus(
        stdout_tail="key=value-of-k and value-of-k-long",
        stderr_tail="err value-of-k",
        message="failed: value-of-k",
        outputs_json='{"a": 1}',
    )
    launch.redact(s, ["value-of-k", "value-of-k-long", ""])
    assert s.stdout_tail == f"key={launch.REDACTED} and {launch.REDACTED}"
    assert s.stderr_tail == f"err {launch.REDACTED}"
    assert s.message == f"failed: {launch.REDACTED}"
    assert s.outputs_json == '{"a": 1}'


def test_redact_without_secrets_changes_nothing():
    s = agent_pb2.TaskStatus(stdout_tail="plain")
    launch.redact(s, [])
    assert s.stdout_tail == "plain"
