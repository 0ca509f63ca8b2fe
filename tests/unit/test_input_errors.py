"""Bad input is refused with one line naming the option or field, never a traceback: the CLI
exits non-zero, the SDK raises InvalidSpecError (no controller needed for either)."""

from __future__ import annotations

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
