"""The reaper stops the groups it was told of once the agent's pipe closes, including those
told just before (still in the pipe, not read yet), and leaves the ones that ended."""

from __future__ import annotations

import subprocess
import sys
import time

from tether.agent.runtimes.reaper import alive, start_ticks


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "30"], start_new_session=True)


def test_groups_told_just_before_the_pipe_closes_are_stopped():
    reaper = subprocess.Popen(
        [sys.executable, "-m", "tether.agent.runtimes.reaper"], stdin=subprocess.PIPE
    )
    kept, ended, told_last = _sleeper(), _sleeper(), _sleeper()
    assert reaper.stdin is not None
    try:
        reaper.stdin.write(f"+{kept.pid} {start_ticks(kept.pid)}\n".encode())
        reaper.stdin.write(f"+{ended.pid} {start_ticks(ended.pid)}\n".encode())
        reaper.stdin.flush()
        time.sleep(0.5)  # past a read of the pipe
        last = f"-{ended.pid}\n+{told_last.pid}\n"  # the reaper reads its start time itself
        reaper.stdin.write(last.encode())
        reaper.stdin.close()  # the agent dies: what it wrote last is still unread
        reaper.wait(5)
        for p in (kept, told_last):
            assert p.wait(2) < 0  # killed by a signal
        assert ended.poll() is None and alive(ended.pid, start_ticks(ended.pid))
    finally:
        for p in (kept, ended, told_last):
            p.kill()
            p.wait()
