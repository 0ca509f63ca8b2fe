"""The process runtime finds a task's program in the task's own PATH, and a program that moved
since it was last found is searched for again rather than failing the start."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import LaunchSpec
from tether.agent.runtimes.process import ProcessRuntime


def _program(d: Path, text: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "tether-test-prog"
    p.write_text(f"#!/bin/sh\necho {text}\n")
    p.chmod(0o755)


def _run(runtime: ProcessRuntime, tmp_path: Path, path: str, n: int) -> str:
    attempt = tmp_path / f"a{n}"
    attempt.mkdir()
    spec = LaunchSpec(
        name="t",
        command=["tether-test-prog"],
        env={"PATH": path},
        working_dir="",
        attempt_dir=attempt,
        stdout_path=attempt / "stdout.log",
        stderr_path=attempt / "stderr.log",
    )

    async def go():
        handle = await runtime.start(spec)
        status = await handle.wait()
        assert status.exit_code == 0
        await runtime.close()

    asyncio.run(go())
    return (attempt / "stdout.log").read_text()


def test_the_program_is_found_in_the_tasks_path_and_again_once_it_moved(tmp_path):
    runtime = ProcessRuntime(AgentConfig(node="n1", work_dir=tmp_path / "work"))
    first, second = tmp_path / "bin1", tmp_path / "bin2"
    _program(first, "one")
    path = f"{first}:{second}"
    assert _run(runtime, tmp_path, path, 1) == "one\n"
    (first / "tether-test-prog").unlink()
    _program(second, "two")
    assert _run(runtime, tmp_path, path, 2) == "two\n"
