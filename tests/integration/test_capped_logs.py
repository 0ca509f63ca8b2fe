"""Attempt log files stop at the size cap, and the process runtime never stalls a task on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from helpers import PY

from tether.agent.runtimes.base import LaunchSpec
from tether.agent.runtimes.capped_log import CappedLog, truncation_note
from tether.agent.runtimes.process import ProcessRuntime


def test_capped_log_keeps_the_first_bytes_and_notes_the_truncation_once(tmp_path):
    calls = []
    log = CappedLog(tmp_path / "out.log", 10, lambda: calls.append(1))
    log.write(b"12345")
    log.write(b"6789abcdef")
    log.write(b"more")
    log.close()
    log.close()
    assert (tmp_path / "out.log").read_bytes() == b"123456789a" + truncation_note(10)
    assert calls == [1] and log.truncated and log.written == 10


def test_capped_log_without_a_limit_keeps_everything(tmp_path):
    log = CappedLog(tmp_path / "out.log", 0)
    for _ in range(100):
        log.write(b"x" * 1000)
    log.close()
    assert (tmp_path / "out.log").stat().st_size == 100_000 and not log.truncated


def _launch(tmp_path, command, limit, events=None) -> LaunchSpec:
    return LaunchSpec(
        name="t",
        command=command,
        env={},
        working_dir="",
        attempt_dir=tmp_path,
        stdout_path=tmp_path / "stdout.log",
        stderr_path=tmp_path / "stderr.log",
        log_limit_bytes=limit,
        on_event=(lambda kind, msg: events.append((kind, msg))) if events is not None else None,
    )


def test_process_output_past_the_cap_is_drained_not_blocking(tmp_path):
    # 4 MiB on stdout is far more than a pipe holds: the task only finishes if the agent
    # keeps reading after the cap.
    code = (
        "import sys\n"
        "sys.stderr.write('err line\\n'); sys.stderr.flush()\n"
        "for i in range(4096): sys.stdout.write(f'{i:07d}' + 'x' * 1016 + '\\n')\n"
    )
    events: list = []

    async def main():
        handle = await ProcessRuntime().start(_launch(tmp_path, [PY, "-c", code], 5000, events))
        return await asyncio.wait_for(handle.wait(), 30)

    assert asyncio.run(main()).exit_code == 0
    out = (tmp_path / "stdout.log").read_bytes()
    assert out.startswith(b"0000000xxx") and out.endswith(truncation_note(5000))
    assert len(out) == 5000 + len(truncation_note(5000))
    assert (tmp_path / "stderr.log").read_bytes() == b"err line\n"
    assert [kind for kind, _ in events] == ["log_truncated"]
    assert "stdout" in events[0][1] and "5000" in events[0][1]


def test_a_background_child_holding_the_pipes_does_not_hold_the_attempt(tmp_path):
    async def main():
        handle = await ProcessRuntime().start(
            _launch(tmp_path, ["sh", "-c", "sleep 30 & echo $!"], 0)
        )
        started = time.monotonic()
        status = await asyncio.wait_for(handle.wait(), 10)
        return status, time.monotonic() - started

    status, took = asyncio.run(main())
    child = int((tmp_path / "stdout.log").read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    assert status.exit_code == 0 and took < 5


def test_missing_program_is_a_runtime_error_and_leaves_no_open_files(tmp_path):
    from tether.agent.runtimes.base import RuntimeError_

    before = len(os.listdir("/proc/self/fd"))

    async def main():
        await ProcessRuntime().start(_launch(tmp_path, ["/nonexistent/prog"], 100))

    try:
        asyncio.run(main())
    except RuntimeError_ as e:
        assert "cannot start '/nonexistent/prog'" in str(e)
    else:
        raise AssertionError("expected RuntimeError_")
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_argument_the_os_refuses_is_a_runtime_error_and_leaves_no_open_files(tmp_path):
    import pytest

    from tether.agent.runtimes.base import RuntimeError_

    async def main():
        for _ in range(5):
            with pytest.raises(RuntimeError_):
                await ProcessRuntime().start(_launch(tmp_path, ["echo", "x\0y"], 100))

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_missing_working_dir_is_named_not_the_program(tmp_path, monkeypatch):
    import dataclasses

    import pytest

    from tether.agent.runtimes import spawn as spawn_mod
    from tether.agent.runtimes.base import RuntimeError_

    missing = str(tmp_path / "no" / "such" / "dir")

    async def start(command):
        spec = dataclasses.replace(_launch(tmp_path, command, 100), working_dir=missing)
        await ProcessRuntime().start(spec)

    # A program found in PATH, one given by path, and through Popen where fork_exec is not used.
    for command, fast in ((["pwd"], True), (["/bin/pwd"], True), (["pwd"], False)):
        monkeypatch.setattr(spawn_mod, "_FAST", fast and spawn_mod._FAST)
        with pytest.raises(RuntimeError_) as e:
            asyncio.run(start(command))
        assert str(e.value) == f"cannot enter working_dir {missing!r}: No such file or directory"
