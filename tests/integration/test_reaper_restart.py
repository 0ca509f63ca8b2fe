"""A reaper that died is replaced at the next task, and the new one stops that task when the
agent's pipe closes (real processes, no controller)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import LaunchSpec
from tether.agent.runtimes.process import ProcessRuntime


def _spec(tmp_path, name: str) -> LaunchSpec:
    d = tmp_path / name
    d.mkdir()
    return LaunchSpec(
        name=name,
        command=[sys.executable, "-c", "import time; time.sleep(30)"],
        env={},
        working_dir="",
        attempt_dir=d,
        stdout_path=d / "stdout.log",
        stderr_path=d / "stderr.log",
        image="",
        cpu=0,
        memory_bytes=0,
        gpu_indices=[],
        labels={},
    )


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_dead_reaper_is_replaced_and_the_new_one_knows_the_next_task(tmp_path):
    async def go():
        runtime = ProcessRuntime(AgentConfig(node="n1", work_dir=tmp_path / "work"))
        first = await runtime.start(_spec(tmp_path, "first"))
        reaper = runtime._reaper
        assert reaper is not None and reaper.poll() is None
        reaper.kill()
        reaper.wait()
        second = await runtime.start(_spec(tmp_path, "second"))
        new = runtime._reaper
        assert new is not None and new is not reaper and new.poll() is None
        pid = second._proc.pid
        # The agent "dies": its pipe to the reaper closes. The new reaper was told of the
        # second task (its line was written again after the broken pipe) and stops it.
        assert new.stdin is not None
        new.stdin.close()
        assert await asyncio.to_thread(_gone, pid, 10), "the new reaper did not stop the task"
        await first.stop(1)
        await asyncio.to_thread(new.wait, 10)
        runtime._reaper = None
        await runtime.close()

    asyncio.run(go())
