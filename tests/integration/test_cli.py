"""The `tether` command against a real mesh: output, exit codes, one-line errors."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
from helpers import assert_one_line_error, py, tether


def test_nodes_submit_wait_and_status(mesh, tmp_path):
    mesh.add_agent("cli-node", labels={"zone": "z1"}, fake_gpus="1")
    res = tether("nodes", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    assert "cli-node" in res.stdout and "zone=z1" in res.stdout and "0/1" in res.stdout

    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: cli-demo\n"
        "tasks:\n"
        f"  - name: hello\n    command: [{sys.executable}, -c, \"print('hello from tether')\"]\n"
        f"  - name: after\n    depends_on: [hello]\n"
        f"    command: [{sys.executable}, -c, \"print('done')\"]\n"
    )
    res = tether("--controller", mesh.address, "submit", str(wf), "--wait")
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.split()[1]
    assert "SUCCEEDED" in res.stdout and "done" in res.stdout

    res = tether("status", run_id, controller=mesh.address)
    assert res.returncode == 0, res.stderr
    assert "hello" in res.stdout and "after" in res.stdout and res.stdout.count("SUCCEEDED") >= 3
    res = tether("status", controller=mesh.address)
    assert run_id in res.stdout and "cli-demo" in res.stdout


def test_failed_run_exits_non_zero(mesh, tmp_path):
    mesh.add_agent("n1")
    wf = tmp_path / "fail.yaml"
    wf.write_text(
        "name: f\ntasks:\n  - name: x\n"
        f"    command: [{sys.executable}, -c, 'raise SystemExit(2)']\n"
    )
    res = tether("submit", str(wf), "--wait", controller=mesh.address)
    assert res.returncode == 1
    assert "FAILED" in res.stdout


@pytest.mark.parametrize(
    ("yaml", "needle"),
    [
        (
            "name: c\ntasks:\n  - {name: a, command: [x], depends_on: [b]}\n"
            "  - {name: b, command: [x], depends_on: [a]}\n",
            "cycle: a -> b -> a",
        ),
        ("name: c\ntasks:\n  - {name: a, command: [x], depends_on: [zz]}\n", "unknown task 'zz'"),
        (
            "name: c\ntasks:\n  - {name: a, command: [x]}\n  - {name: a, command: [x]}\n",
            "tasks[1] (a).name: duplicate task name",
        ),
        (
            "name: c\ntasks:\n  - {name: a, command: [x], resources: {cpu: -1}}\n",
            "tasks[0] (a).resources.cpu: must be >= 0",
        ),
        (
            "name: c\ntasks:\n  - {name: a, command: [x], colour: red}\n",
            "tasks[0] (a).colour: unknown field",
        ),
    ],
)
def test_bad_spec_prints_one_line_and_fails(mesh, tmp_path, yaml, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml)
    res = tether("submit", str(f), controller=mesh.address)
    assert_one_line_error(res, needle)


def test_unreachable_controller_is_one_line():
    res = tether("nodes", controller="127.0.0.1:1", timeout=60)
    assert_one_line_error(res, "unavailable")


def test_unknown_run_is_one_line(mesh):
    assert_one_line_error(tether("status", "nope", controller=mesh.address), "not found")


def test_watch_prints_every_change_until_the_end(mesh):
    from tether.sdk import Workflow

    mesh.add_agent("n1")
    wf = Workflow("watch-cli")
    a = wf.task("a", [sys.executable, "-c", "import time; time.sleep(0.3)"])
    wf.task("b", [sys.executable, "-c", "pass"], depends_on=[a])
    run = mesh.client().submit(wf)
    res = tether("watch", run.id, controller=mesh.address)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("rev ") and run.id in lines[0]
    # b's success shows as a change, or in the snapshot if the run ended before the watch began.
    assert any(": b SUCCEEDED" in x or x.strip() == "b: SUCCEEDED" for x in lines), lines
    # The final state: as a change, or in a snapshot if the run ended before the watch began.
    assert any(re.fullmatch(r"rev \d+: run (\S+ )?SUCCEEDED", x) for x in lines), lines


def test_controller_without_etcd_is_one_line():
    from tether.controller.etcd_process import free_port

    etcd = f"127.0.0.1:{free_port()}"
    args = ("--etcd", etcd, "--listen", "127.0.0.1:0", "--etcd-wait", "1s")
    res = tether("controller", *args, timeout=60)
    assert_one_line_error(res, "etcd not reachable")


def test_controller_on_a_taken_port_is_one_line(mesh):
    res = tether(
        "controller",
        "--etcd",
        mesh.config.etcd_endpoints[0],
        "--prefix",
        "/taken",
        "--listen",
        mesh.address,
        timeout=60,
    )
    assert_one_line_error(res, "cannot serve on")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfename: x\n")
    assert_one_line_error(tether("submit", str(f), controller="127.0.0.1:1"), "not UTF-8")


def test_submit_and_status_print_the_trace_and_trace_draws_the_timeline(
    mesh, tmp_path, monkeypatch
):
    mesh.add_agent("n1")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: timed\ntasks:\n"
        f"  - name: first\n    command: [{sys.executable}, -c, 'import time; time.sleep(0.2)']\n"
        f"  - name: second\n    depends_on: [first]\n    command: [{sys.executable}, -c, 'pass']\n"
    )
    res = tether("submit", str(wf), "--wait", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.split()[1]
    run = mesh.client().get_run(run_id)
    trace_id = run.traceparent.split("-")[1]
    assert f"trace {trace_id}\n" in res.stdout

    monkeypatch.setenv("TETHER_TRACE_URL", "http://jaeger:16686/trace/{trace_id}")
    res = tether("status", run_id, controller=mesh.address)
    assert f"trace {trace_id}  http://jaeger:16686/trace/{trace_id}" in res.stdout

    res = tether("trace", run_id, "--width", "100", controller=mesh.address)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"run {run_id} (timed) SUCCEEDED in ")
    assert lines[1] == f"trace {trace_id}  http://jaeger:16686/trace/{trace_id}"
    assert "critical path (*): first → second" in res.stdout
    rows = [line for line in lines if line.startswith("* ")]
    assert [r.split()[1] for r in rows] == ["first#1", "second#1"]
    assert all(len(line) <= 100 for line in lines)

    assert_one_line_error(tether("trace", "0" * 20, controller=mesh.address), "not found")


def _stop_etcds_on(data_dir):
    """Kill what a failed `tether dev` left on ``data_dir`` (so a failing test cleans up);
    return how many there were."""
    import os
    import signal

    from tether.controller.etcd_process import _running_on

    pids = _running_on(data_dir / "etcd" / "data")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


@pytest.mark.parametrize(
    "args, flag, needle",
    [
        (("--listen", "nohost"), "--listen", "'nohost' has no port"),
        (("--listen", "127.0.0.1:99999"), "--listen", "port 99999"),
        (("--lease-ttl", "0"), "--lease-ttl", "must be >= 1"),
        (("--drain-grace", "soon"), "--drain-grace", "invalid duration 'soon'"),
    ],
)
def test_dev_refuses_a_bad_setting_before_starting_etcd(tmp_path, args, flag, needle):
    data = tmp_path / "dev"
    try:
        res = tether("dev", *args, "--data-dir", str(data), timeout=30)
        # A usage error, as for --metrics-listen: click's usage lines, then one naming the flag.
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error:") and flag in last and needle in last, last
        assert not (data / "etcd").exists()
    finally:
        assert _stop_etcds_on(data) == 0, "an etcd was left running on the data dir"


def test_dev_stops_its_etcd_when_the_controller_cannot_start(tmp_path):
    import socket

    data = tmp_path / "dev"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            res = tether("dev", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data))
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
            assert res.stderr.strip().splitlines()[-1] == (
                f"error: 127.0.0.1:{port} is not available: Address already in use"
            )
            assert (data / "etcd" / "data").is_dir()  # etcd had started
        finally:
            assert _stop_etcds_on(data) == 0, "an etcd was left running on the data dir"


def test_dev_says_in_one_line_that_an_etcd_holds_its_data_dir(tmp_path):
    from tether.controller.etcd_process import EtcdProcess

    data = tmp_path / "dev"
    left = EtcdProcess(data / "etcd").start()  # as a killed `tether dev` leaves it
    try:
        res = tether("dev", "--listen", "127.0.0.1:0", "--data-dir", str(data), timeout=15)
        assert_one_line_error(res, f"{data / 'etcd'} is in use by another etcd")
        assert f"(pid {left.proc.pid})" in res.stderr
    finally:
        left.stop()
        _stop_etcds_on(data)  # a second etcd, had tether dev started one


def _running_with(arg: str) -> int:
    """The id of the process with ``arg`` among its arguments."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        return int(entry)
            except OSError:
                pass
    raise AssertionError(f"no process with {arg}")


def _sleepy(tmp_path):
    """A workflow file whose one task runs for a minute."""
    wf = tmp_path / "sleepy.yaml"
    wf.write_text(
        f"name: sleepy\ntasks:\n  - name: s\n    command: {py('import time; time.sleep(60)')}\n"
    )
    return wf


def _dev(data, *args, **popen):
    """``tether dev`` with one agent on a free port, as a process."""
    import subprocess

    command = [sys.executable, "-m", "tether.sdk.cli", "dev", "--agents", "1"]
    command += ["--listen", "127.0.0.1:0", "--data-dir", str(data), *args]
    return subprocess.Popen(command, text=True, **popen)


def test_dev_with_a_drain_grace_lets_a_running_task_finish(tmp_path):
    import json
    import signal
    import subprocess

    from helpers import wait_for

    data = tmp_path / "dev"
    wf = tmp_path / "short.yaml"
    wf.write_text(
        f"name: short\ntasks:\n  - name: s\n    command: {py('import time; time.sleep(2)')}\n"
    )
    # In a session of its own, to be Ctrl-C'd as in a terminal: SIGINT to its whole process
    # group, which holds its etcd and agents unless they have groups of their own.
    dev = _dev(
        data,
        "--drain-grace",
        "30s",
        "--run",
        str(wf),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def task_started() -> bool:
            try:
                return bool(_running_with("import time; time.sleep(2)"))
            except AssertionError:
                return False

        wait_for(task_started, 30, "the task to start")
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(60) == 128 + signal.SIGINT
        log = [json.loads(x) for x in (data / "agent-dev-1.log").read_text().splitlines()]
        # The task was running when the drain began, and finished within its grace (etcd
        # still up to record it).
        assert [x["running"] for x in log if x.get("event") == "draining"] == [1], log
        assert [x["stopped"] for x in log if x.get("event") == "drained"] == [0], log
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        _stop_etcds_on(data)


def test_dev_stops_cleanly_with_a_watch_open(tmp_path):
    import signal
    import subprocess

    from helpers import wait_for

    data = tmp_path / "dev"
    wf = _sleepy(tmp_path)
    dev = _dev(data, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    watch = None
    try:
        lines = []
        for line in dev.stderr:
            lines.append(line)
            if "ready" in line:
                break
        address = next(x for x in lines if x.startswith("tether dev: etcd")).split()[5]
        address = address.rstrip(",")
        res = tether("submit", str(wf), controller=address)
        assert res.returncode == 0, res.stderr
        run_id = res.stdout.split()[1]
        watch = subprocess.Popen(
            [sys.executable, "-m", "tether.sdk.cli", "--controller", address, "watch", run_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # A task running: the watch is open on its changes (that case left the stream open
        # until gRPC's stop cancelled it).
        while "s: RUNNING" not in watch.stdout.readline():
            pass
        time.sleep(2)  # open a moment: a watch just opened did not show the traceback
        # The agent goes first (as after a crash), so tether dev need not wait for its drain.
        os.kill(_running_with(str(data / "agents" / "dev-1")), signal.SIGKILL)
        dev.send_signal(signal.SIGINT)
        rest = dev.stderr.read()
        assert dev.wait(60) == 0
        assert "Traceback" not in rest and "CancelledError" not in rest, rest
        assert "tether dev: stopped" in rest
        log = (data / "controller.log").read_text()
        assert "Exception not handled" not in log and "CancelledError" not in log
        # The watch ended with UNAVAILABLE: the client says so and tries again.
        os.set_blocking(watch.stderr.fileno(), False)
        seen = []
        wait_for(
            lambda: seen.append(watch.stderr.read() or "") or "unavailable" in "".join(seen),
            10,
            "the watch to report the controller unavailable",
        )
    finally:
        for p in (watch, dev):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        _stop_etcds_on(data)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_dev_run_stopped_by_a_signal_stops_its_mesh(tmp_path, signame):
    import signal
    import subprocess

    sig = getattr(signal, signame)  # SIGHUP: its terminal closed

    data = tmp_path / "dev"
    wf = _sleepy(tmp_path)
    dev = _dev(data, "--run", str(wf), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        # The run is submitted and followed (its id printed): stop it as a service manager would.
        while not dev.stdout.readline().startswith("run "):
            assert dev.poll() is None, "tether dev ended early"
        agent = _running_with(str(data / "agents" / "dev-1"))
        dev.send_signal(sig)
        assert dev.wait(60) == 128 + sig
        # Nothing of the mesh is left (by default the signal would end dev alone, at once).
        assert _stop_etcds_on(data) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(agent, 0)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        _stop_etcds_on(data)
