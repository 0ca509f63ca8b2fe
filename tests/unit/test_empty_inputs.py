"""Attempts without inputs share one read-only inputs.json (a hard link each) where their
runtime gives them no isolation, and every one of them reads the right content whatever
happened to the shared file (real files, no runtime)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat

from opentelemetry import trace

from tether.agent import launch, layout
from tether.agent.config import AgentConfig
from tether.agent.runner import Runner
from tether.agent.runtimes.process import ProcessRuntime
from tether.api.v1 import agent_pb2

EMPTY = {"params": {}, "tasks": {}}


def assign(task: str, attempt: int = 1, **inputs) -> agent_pb2.AssignTask:
    a = agent_pb2.AssignTask(ref=agent_pb2.AttemptRef(run_id="run1", task=task, attempt=attempt))
    a.spec.name = task
    a.params.update(inputs)
    return a


def staged(work, shared, task, attempt=1, **inputs):
    d = f"{work}/run1/{task}/{attempt}"
    launch.stage(d, assign(task, attempt, **inputs), shared)
    path = f"{d}/{layout.INPUTS_FILE}"
    with open(path) as f:
        return json.load(f), os.stat(path)


def test_attempts_without_inputs_link_one_read_only_file(tmp_path):
    shared = launch.EmptyInputs(str(tmp_path))
    first, st1 = staged(tmp_path, shared, "a")
    second, st2 = staged(tmp_path, shared, "b")
    assert first == second == EMPTY
    assert st1.st_ino == st2.st_ino == os.stat(shared.path).st_ino
    assert st2.st_nlink == 3  # the shared file and two attempts
    assert stat.S_IMODE(st2.st_mode) == 0o444
    # Attempts with inputs get a file of their own.
    own, st3 = staged(tmp_path, shared, "c", lr="0.1")
    assert own == {"params": {"lr": "0.1"}, "tasks": {}} and st3.st_ino != st1.st_ino
    # Without an EmptyInputs (an isolated runtime), a file each.
    d = f"{tmp_path}/run1/d/1"
    launch.stage(d, assign("d"))
    assert os.stat(f"{d}/{layout.INPUTS_FILE}").st_ino != st1.st_ino


def test_a_changed_or_removed_shared_file_is_replaced_before_the_next_link(tmp_path):
    shared = launch.EmptyInputs(str(tmp_path))
    _, before = staged(tmp_path, shared, "a")
    # A task running as the agent's user rewrites its inputs file in place.
    os.chmod(shared.path, 0o644)
    with open(f"{tmp_path}/run1/a/1/{layout.INPUTS_FILE}", "w") as f:
        f.write('{"params": {"x": 1}}')
    content, after = staged(tmp_path, shared, "b")
    assert content == EMPTY and after.st_ino != before.st_ino
    os.unlink(shared.path)
    content, _ = staged(tmp_path, shared, "c")
    assert content == EMPTY and os.path.samefile(shared.path, f"{tmp_path}/run1/c/1/inputs.json")


def test_a_retry_with_inputs_in_the_same_directory_leaves_the_shared_file_alone(tmp_path):
    shared = launch.EmptyInputs(str(tmp_path))
    staged(tmp_path, shared, "a")
    # The same attempt staged again (its assignment resent), now with inputs: writing them
    # through the link would give every attempt without inputs these.
    content, _ = staged(tmp_path, shared, "a", lr="0.1")
    assert content["params"] == {"lr": "0.1"}
    with open(shared.path) as f:
        assert json.load(f) == EMPTY
    assert staged(tmp_path, shared, "b")[0] == EMPTY


def test_link_limit_starts_a_new_file_and_no_links_falls_back_to_a_file_each(tmp_path, monkeypatch):
    shared = launch.EmptyInputs(str(tmp_path))
    _, first = staged(tmp_path, shared, "a")
    real_link = os.link
    refusals = iter([errno.EMLINK])

    def link_at_limit(src, dst):
        code = next(refusals, None)
        if code is not None:
            raise OSError(code, os.strerror(code))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_at_limit)
    content, second = staged(tmp_path, shared, "b")
    assert content == EMPTY and second.st_ino != first.st_ino and second.st_nlink == 2

    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    content, third = staged(tmp_path, shared, "c")
    assert content == EMPTY and third.st_nlink == 1 and not shared.enabled
    monkeypatch.setattr(os, "link", real_link)
    assert staged(tmp_path, shared, "d")[1].st_nlink == 1  # not tried again


def test_the_process_runtime_links_and_its_task_reads_the_inputs(tmp_path):
    reports: list[agent_pb2.TaskStatus] = []
    config = AgentConfig(node="n1", work_dir=tmp_path)
    runtime = ProcessRuntime(config)
    runner = Runner(config, runtime, trace.get_tracer("test"), reports.append)

    async def go():
        for task in ("a", "b"):
            a = assign(task)
            a.spec.command.extend(
                ["/bin/sh", "-c", 'cat "$TETHER_INPUTS_FILE" > "$TETHER_OUTPUT_FILE"']
            )
            runner.assign(a)
        for _ in range(500):
            done = [r for r in reports if r.outputs_json]
            if len(done) == 2:
                break
            await asyncio.sleep(0.01)
        await runtime.close()
        return done

    done = asyncio.run(go())
    assert [json.loads(r.outputs_json) for r in done] == [EMPTY, EMPTY]
    a, b = (tmp_path / "run1" / t / "1" / layout.INPUTS_FILE for t in ("a", "b"))
    assert os.path.samefile(a, b) and os.path.samefile(a, tmp_path / ".empty-inputs.json")
