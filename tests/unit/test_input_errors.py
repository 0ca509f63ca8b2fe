"""Bad input is refused with one line naming the option or field, never a traceback: the CLI
exits non-zero, the SDK raises InvalidSpecError (no controller needed for either)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tether

from tether.sdk import Client, InvalidSpecError, Workflow

# Nothing listens there: every case must be refused before a call is made.
_NOWHERE = "127.0.0.1:1"


def _usage_error(res, needle: str) -> None:
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr + res.stdout
    errors = [x for x in res.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("status", "--limit", "-1"), "'--limit'"),
        (("logs", "r", "t", "--attempt", "99999999999"), "'--attempt'"),
        (("watch", "r", "--from-revision", str(2**70)), "'--from-revision'"),
        (("trace", "r", "--width", "-3"), "'--width'"),
    ],
)
def test_cli_numbers_out_of_range_name_the_option(args, needle):
    _usage_error(tether(*args, controller=_NOWHERE), needle)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempt": 2**40}, "attempt"),
        ({"attempt": -(2**40)}, "attempt"),
        ({"attempt": "1"}, "attempt"),
    ],
)
def test_sdk_logs_refuses_an_attempt_the_request_cannot_hold(kwargs, field):
    with Client(_NOWHERE) as client, pytest.raises(InvalidSpecError) as e:
        list(client.logs("r", "t", **kwargs))
    assert [v.field for v in e.value.violations] == [field]


def test_sdk_watch_and_list_refuse_integers_out_of_range():
    with Client(_NOWHERE) as client:
        with pytest.raises(InvalidSpecError, match=r"^from_revision: must be in 0\.\."):
            list(client.watch("r", from_revision=2**70))
        with pytest.raises(InvalidSpecError, match=r"^page_size: must be in 0\.\."):
            list(client.list_runs(page_size=2**40))


def test_sdk_params_must_be_strings():
    wf = Workflow("w")
    wf.task("a", ["true"])
    with Client(_NOWHERE) as client, pytest.raises(InvalidSpecError) as e:
        client.submit(wf, params={"model": 5, "ok": "x", 3: "y"})
    assert [str(v) for v in e.value.violations] == [
        "params.model: must be a string, got int",
        "params[3]: names must be strings, got int",
    ]


def _many_typos_yaml(n: int) -> str:
    tasks = "".join(f"  - {{name: t{i}, command: [x], depends: [t0]}}\n" for i in range(n))
    return f"name: w\ntasks:\n{tasks}"


def test_local_errors_are_capped_as_the_controllers_are():
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(_many_typos_yaml(3000))
    msg = str(e.value)
    assert len(e.value.violations) == 3000  # every problem is still there for code to read
    assert len(msg) <= 4096 and e.value.message == msg
    assert msg.startswith("tasks[0] (t0).depends: unknown field (did you mean 'depends_on'?)")
    assert msg.endswith("; and 2980 more problems")


def test_a_long_task_name_is_not_echoed_in_full():
    wf = Workflow("w")
    wf.task("n" * 5000, ["true"])
    with pytest.raises(InvalidSpecError) as e:
        wf.to_proto()
    msg = str(e.value)
    assert len(msg) < 600 and "n" * 300 not in msg
    assert msg.startswith("tasks[0] (nnn") and " ... " in msg and ").name: use 1-63" in msg


def test_cli_prints_a_capped_local_error(tmp_path):
    f = tmp_path / "typos.yaml"
    f.write_text(_many_typos_yaml(3000))
    res = tether("submit", str(f), controller=_NOWHERE)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and len(err) <= 4200, len(err)
    assert err.startswith("error: ") and err.endswith("; and 2980 more problems")


@pytest.mark.parametrize("as_path", [False, True])
def test_a_missing_workflow_file_is_named(tmp_path, monkeypatch, as_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(Path("typo.yaml") if as_path else "typo.yaml")
    assert str(e.value) == "typo.yaml: no such file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "{f}: the file is empty (expected a workflow mapping)"),
        ("# nothing yet\n", "{f}: the file is empty (expected a workflow mapping)"),
        ("- a\n- b\n", "{f}: expected a workflow mapping (name, tasks), got a list"),
    ],
)
def test_an_empty_or_wrong_workflow_file_is_named(tmp_path, text, message):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(InvalidSpecError) as e:
        Workflow.from_yaml(str(f))
    assert str(e.value) == message.format(f=f)


def test_empty_yaml_text_says_so():
    with pytest.raises(InvalidSpecError, match=r"^workflow: the text is empty"):
        Workflow.from_yaml("")
    with pytest.raises(InvalidSpecError, match=r"^workflow: expected a workflow mapping"):
        Workflow.from_dict([1])


def test_cli_submit_of_an_empty_file_names_it(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    res = tether("submit", str(f), controller=_NOWHERE)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {f}: the file is empty (expected a workflow mapping)"
