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


def test_the_environment_is_the_agents_with_the_tasks_on_top(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_TEST_AGENT_VAR", "agent")
    monkeypatch.setenv("TETHER_TEST_SHARED", "agent")
    runtime = ProcessRuntime(AgentConfig(node="n1", work_dir=tmp_path))

    def env_of(extra: dict[str, str]) -> dict[bytes, bytes]:
        items = runtime._env(extra)
        keys = [i.partition(b"=")[0] for i in items]
        assert len(keys) == len(set(keys)), "a variable given twice"
        return dict(i.partition(b"=")[::2] for i in items)

    for _ in range(2):  # names seen before take the cached path
        env = env_of({"TETHER_RUN_ID": "r1", "X": "é"})
        assert env[b"TETHER_RUN_ID"] == b"r1" and env[b"X"] == "é".encode()
        assert env[b"TETHER_TEST_AGENT_VAR"] == env[b"TETHER_TEST_SHARED"] == b"agent"
        env = env_of({"TETHER_TEST_SHARED": "task", "Y": "1"})  # the task's value wins
        assert env[b"TETHER_TEST_SHARED"] == b"task" and env[b"Y"] == b"1"
        assert env[b"TETHER_TEST_AGENT_VAR"] == b"agent"
    try:
        runtime._env({"A=B": "1"})
    except ValueError as e:
        assert "A=B" in str(e)
    else:
        raise AssertionError("a name with '=' was accepted")
