"""The process runtime's spawn: the same child, and the same errors, as subprocess.Popen gives,
through CPython's fork_exec directly or through Popen where that is not known."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tether.agent.runtimes import spawn as spawn_mod
from tether.agent.runtimes.spawn import spawn

ENV = [b"PATH=/usr/bin:/bin", b"TETHER_X=1"]


@pytest.fixture(params=["fork_exec", "popen"])
def mode(request, monkeypatch):
    if request.param == "popen":
        monkeypatch.setattr(spawn_mod, "_FAST", False)  # through popen_child
    elif not spawn_mod._FAST:
        pytest.skip(f"fork_exec is not used on Python {sys.version_info[:2]}")
    return request.param


def _run(args, tmp_path, env=ENV, cwd=None):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        child = spawn(
            args,
            args[0],
            env,
            cwd=str(cwd or tmp_path),
            stdin=0,
            stdout=out,
            stderr=out,
        )
    finally:
        os.close(out)
    return child


def test_runs_in_its_own_session_with_the_given_env_cwd_and_output(mode, tmp_path):
    child = _run(["/bin/sh", "-c", 'echo "$TETHER_X $PWD"; exec sleep 0.3'], tmp_path)
    # The task leads a session (and process group) of its own: signalled as one group.
    assert os.getsid(child.pid) == os.getpgid(child.pid) == child.pid
    assert child.wait() == 0 and child.returncode == 0 and child.poll() == 0
    assert (tmp_path / "out").read_text() == f"1 {tmp_path}\n"


def test_exit_codes_and_signals_come_back_as_popen_gives_them(mode, tmp_path):
    assert _run(["/bin/sh", "-c", "exit 3"], tmp_path).wait() == 3
    child = _run(["/bin/sh", "-c", "kill -TERM $$"], tmp_path)
    assert child.wait() == -signal.SIGTERM
    # Polled while it runs, then reaped once it ended.
    child = _run(["/bin/sleep", "0.2"], tmp_path)
    assert child.poll() is None
    assert child.wait() == 0


def test_a_missing_program_or_directory_is_the_oserror_popen_raises(mode, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        _run(["/nonexistent/prog"], tmp_path)
    assert e.value.filename == "/nonexistent/prog"
    with pytest.raises(FileNotFoundError) as e:
        _run(["/bin/true"], tmp_path, cwd=tmp_path / "gone")
    assert e.value.filename == str(tmp_path / "gone")
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):  # not executable
        _run([str(script)], tmp_path)


def test_a_nul_byte_is_a_value_error_and_leaves_no_open_fds(mode, tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        _run(["/bin/echo", "x\0y"], tmp_path)
    with pytest.raises(ValueError):
        _run(["/bin/true"], tmp_path, env=[b"A=b\0c"])
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            _run(["/nonexistent/prog"], tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_child_reaped_elsewhere_reads_as_popen_reads_it(mode, tmp_path):
    child = _run(["/bin/true"], tmp_path)
    os.waitpid(child.pid, 0)  # as the kernel does with SIGCHLD ignored
    assert child.poll() == 0 and child.wait() == 0
