"""Secret references in task env: the YAML and SDK forms, and their validation."""

from __future__ import annotations

import pytest

from tether.sdk import InvalidSpecError, Secret, Workflow

_YAML = """
name: wf
tasks:
  - name: call
    command: [sh, -c, 'echo "$API_KEY"']
    env:
      API_KEY: {secret: openai-key}
      MODE: fast
      N: 3
"""


def test_yaml_reference_becomes_env_secrets():
    task = Workflow.from_yaml(_YAML).to_proto().tasks[0]
    assert dict(task.env_secrets) == {"API_KEY": "openai-key"}
    assert dict(task.env) == {"MODE": "fast", "N": "3"}


def test_sdk_reference_becomes_env_secrets():
    wf = Workflow("wf")
    wf.task("call", ["true"], env={"API_KEY": Secret("openai-key"), "MODE": "fast"})
    task = wf.to_proto().tasks[0]
    assert dict(task.env_secrets) == {"API_KEY": "openai-key"}
    assert dict(task.env) == {"MODE": "fast"}


def test_yaml_and_sdk_forms_agree():
    wf = Workflow("wf")
    wf.task(
        "call",
        ["sh", "-c", 'echo "$API_KEY"'],
        env={"API_KEY": Secret("openai-key"), "MODE": "fast", "N": "3"},
    )
    assert wf.to_proto() == Workflow.from_yaml(_YAML).to_proto()


def test_secret_shows_as_its_reference():
    assert str(Secret("openai-key")) == "secret:openai-key"


@pytest.mark.parametrize(
    "value",
    ["{secrt: x}", "{secret: x, other: y}", "{secret: [x]}", "{}"],
)
def test_malformed_yaml_reference_names_the_variable(value):
    text = f"name: wf\ntasks:\n  - name: a\n    command: [x]\n    env: {{API_KEY: {value}}}\n"
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(text)
    (v,) = e.value.violations
    assert v.field == "tasks[0] (a).env"
    assert v.description.startswith("API_KEY: a secret reference is {secret: NAME}")


def test_bad_secret_name_is_refused_with_the_field():
    wf = Workflow("wf")
    wf.task("a", ["x"], env={"API_KEY": Secret("no spaces")})
    with pytest.raises(InvalidSpecError) as e:
        wf.to_proto()
    (v,) = e.value.violations
    assert v.field == "tasks[0] (a).env.API_KEY"
    assert "secret name" in v.description


def test_bad_variable_name_for_a_secret():
    wf = Workflow("wf")
    wf.task("a", ["x"], env={"1BAD": Secret("ok")})
    with pytest.raises(InvalidSpecError) as e:
        wf.to_proto()
    assert e.value.violations[0].field == "tasks[0] (a).env.1BAD"


def test_variable_both_plain_and_secret_is_refused():
    wf = Workflow("wf")
    spec = wf.task("a", ["x"], env={"K": Secret("ok")}).to_proto()
    spec.env["K"] = "plain"
    from tether.api.v1 import types_pb2
    from tether.sdk.validation import validate_workflow

    with pytest.raises(InvalidSpecError, match="both as a value and as a secret"):
        validate_workflow(types_pb2.WorkflowSpec(name="wf", tasks=[spec]))
