"""The `tether` command's scripting surface: global options anywhere, -o formats, NDJSON,
whole ids in pipes, human units, failed tasks' stderr, one-line input errors, dev --param."""

from __future__ import annotations

import re
import sys

import pytest
import structlog
from click.testing import CliRunner
from helpers import assert_one_line_error, tether

from tether.sdk.cli import cli


@pytest.fixture(autouse=True)
def _logs_to_stderr():
    """The in-process mesh logs to stdout, which CliRunner captures as the command's: send
    those logs to stderr while these tests read a command's stdout."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__))
    yield
    structlog.configure(**saved)


def run_cli(*args: str, controller: str | None = None, env: dict | None = None) -> str:
    """``tether ARGS`` in this process (a subprocess costs a second of imports); its stdout.

    Used where the output is what is checked; exit codes and one-line errors are checked
    with real subprocesses (``tether``), as a shell runs them.
    """
    env = {**(env or {}), **({"TETHER_CONTROLLER": controller} if controller else {})}
    result = CliRunner().invoke(cli, list(args), prog_name="tether", env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def _run_to_end(mesh, wf):
    run = mesh.client().submit(wf)
    run.wait(timeout=30)
    return run.id


def test_global_options_go_before_or_after_the_command_and_h_version(mesh):
    mesh.add_agent("g1")
    for args in (
        ("nodes", "--controller", mesh.address),
        ("--controller", "127.0.0.1:1", "nodes", "--controller", mesh.address),
        ("nodes", "-o", "name", "--controller", mesh.address, "--token", ""),
    ):
        assert "g1" in run_cli(*args)
    assert "node g1 cordoned" in run_cli("nodes", "cordon", "g1", "--controller", mesh.address)
    assert re.fullmatch(r"tether \d+\.\d+\.\S+\n", run_cli("--version"))
    for args in (("-h",), ("status", "-h"), ("nodes", "cordon", "-h"), ("agent", "-h")):
        assert run_cli(*args).startswith("Usage: tether"), args
    res = tether("nodes", "--controller", mesh.address)  # and as a shell runs it
    assert res.returncode == 0 and "g1" in res.stdout, res.stderr


def test_controller_address_without_a_port_is_one_line():
    res = tether("nodes", "--controller", "127.0.0.1", timeout=30)
    assert_one_line_error(res, "'127.0.0.1' has no port", "127.0.0.1:7070")
    res = tether("agent", "--controller", "127.0.0.1", timeout=30)
    assert_one_line_error(res, "controller: '127.0.0.1' has no port", "(from --controller)")


def test_read_commands_print_json_yaml_name_and_wide(mesh):
    import json

    import yaml

    from tether.sdk import Workflow

    mesh.add_agent("o1", memory_bytes=24683568 * 1024, labels={"zone": "z"})
    wf = Workflow("formats")
    wf.task("a", [sys.executable, "-c", "print('out')"])
    run_id = _run_to_end(mesh, wf)
    nodes = json.loads(run_cli("nodes", "-o", "json", controller=mesh.address))
    assert [n["name"] for n in nodes] == ["o1"] and nodes[0]["labels"] == {"zone": "z"}
    legacy = json.loads(run_cli("nodes", "--json", controller=mesh.address))
    assert legacy == nodes  # --json stays, the same as -o json
    assert yaml.safe_load(run_cli("nodes", "-o", "yaml", controller=mesh.address)) == nodes
    assert run_cli("nodes", "-o", "name", controller=mesh.address) == "o1\n"
    table = run_cli("nodes", controller=mesh.address)
    assert "/23.5Gi" in table and "Ki" not in table  # human units, not 24683568Ki
    assert "version" in run_cli("nodes", "-o", "wide", controller=mesh.address)

    runs = json.loads(run_cli("status", "--json", controller=mesh.address))
    assert [r["id"] for r in runs] == [run_id] and runs[0]["state"] == "RUN_STATE_SUCCEEDED"
    assert run_cli("status", "-o", "name", controller=mesh.address) == f"{run_id}\n"
    one = yaml.safe_load(run_cli("status", run_id, "-o", "yaml", controller=mesh.address))
    assert one["id"] == run_id and one["tasks"][0]["stdoutTail"] == "out\n"
    assert run_cli("status", run_id, "-o", "name", controller=mesh.address) == "a\n"

    lines = run_cli("logs", run_id, "a", "-o", "json", controller=mesh.address)
    chunks = [json.loads(x) for x in lines.splitlines()]
    assert chunks and all(c["task"] == "a" and c["attempt"] == 1 for c in chunks)
    assert "".join(c["data"] for c in chunks if c["stream"] == "stdout") == "out\n"


def test_watch_json_is_one_event_a_line(mesh):
    import json

    from tether.sdk import Workflow

    mesh.add_agent("w1")
    wf = Workflow("ndjson")
    a = wf.task("a", [sys.executable, "-c", "import time; time.sleep(0.3)"])
    wf.task("b", [sys.executable, "-c", "pass"], depends_on=[a])
    run = mesh.client().submit(wf)
    out = run_cli("watch", run.id, "-o", "json", controller=mesh.address)
    events = [json.loads(line) for line in out.splitlines()]  # each line is JSON
    revisions = [e["revision"] for e in events]
    assert revisions == sorted(revisions) and "snapshot" in events[0]
    last = events[-1]
    final = last.get("runState") or last.get("snapshot", {}).get("state")
    assert final == "RUN_STATE_SUCCEEDED", last


def test_piped_run_lists_keep_whole_ids(mesh):
    import os
    import subprocess

    from tether.sdk import Workflow

    mesh.add_agent("p1")
    wf = Workflow("a-workflow-with-a-rather-long-name-to-squeeze-the-table")
    wf.task("a", [sys.executable, "-c", "pass"])
    run_id = _run_to_end(mesh, wf)
    # A narrow terminal size must not matter when stdout is a pipe.
    env = {**os.environ, "COLUMNS": "40", "TETHER_CONTROLLER": mesh.address}
    res = subprocess.run(
        [sys.executable, "-m", "tether.sdk.cli", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert run_id in res.stdout and "…" not in res.stdout


def test_failed_task_stderr_tail_under_submit_wait_and_status(mesh, tmp_path):
    mesh.add_agent("f1")
    wf = tmp_path / "fails.yaml"
    code = "import sys; [print(f'line {i}', file=sys.stderr) for i in range(30)]; sys.exit(3)"
    wf.write_text(
        f'name: fails\ntasks:\n  - name: broken\n    command: [{sys.executable}, -c, "{code}"]\n'
    )
    res = tether("submit", str(wf), "--wait", controller=mesh.address)
    assert res.returncode == 1
    run_id = res.stdout.split()[1]
    for out in (res.stdout, run_cli("status", run_id, controller=mesh.address)):
        assert "broken failed" in out and "line 29" in out and "line 15" in out
        assert "line 14" not in out  # the last 15 lines, and a note of what is above
        assert "15 lines above" in out and f"tether logs {run_id} broken" in out


def test_unknown_spec_field_suggests_the_likely_one(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("name: t\ntasks:\n  - {name: a, command: [x], depend_on: [b]}\n")
    res = tether("submit", str(f), controller="127.0.0.1:1")
    assert_one_line_error(res, "tasks[0] (a).depend_on: unknown field (did you mean 'depends_on'?)")
    f.write_text("name: t\ntasks:\n  - name: a\n   command: [x]\n")
    assert_one_line_error(tether("submit", str(f), controller="127.0.0.1:1"), f"{f}:4:")


def test_dev_run_takes_params(tmp_path):
    wf = tmp_path / "greet.yaml"
    wf.write_text(
        "name: greet\ntasks:\n  - name: hello\n"
        f"    command: [{sys.executable}, -c, 'print(\"hello, {{{{ params.who }}}}\")']\n"
    )
    res = tether(
        "dev",
        "--agents",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--lease-ttl",
        "3",
        "--data-dir",
        str(tmp_path / "dev"),
        "--run",
        str(wf),
        "--param",
        "who=tether",
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "hello, tether" in res.stdout


def test_shell_completion_offers_commands_and_options():
    env = {"_TETHER_COMPLETE": "bash_complete", "COMP_WORDS": "tether sta", "COMP_CWORD": "1"}
    assert run_cli(env=env).split() == ["plain,status"]
    env.update(COMP_WORDS="tether status -o ", COMP_CWORD="3")
    assert run_cli(env=env).split() == [
        f"plain,{f}" for f in ("table", "wide", "json", "yaml", "name")
    ]
    assert "complete -o nosort -F _tether_completion tether" in run_cli(
        env={"_TETHER_COMPLETE": "bash_source"}
    )
