"""The agent's work-dir cleaner (``work_retention``): which run directories it removes, and
which it must leave alone."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from tether.agent.config import AgentConfig
from tether.agent.retention import REMOVING_PREFIX, WorkDirCleaner, sweep_interval
from tether.controller.records import new_run_id
from tether.sdk.constants import RUN_ID_PATTERN

HOUR = 3600.0
OLD = "0000000000aa00000001"
YOUNG = "0000000000aa00000002"
RUN = "0000000000aa00000003"
RUNNING = "0000000000aa00000004"
ASSIGNED_MEANWHILE = "0000000000aa00000005"
DONE = "0000000000aa00000006"


def _attempt(work: Path, run: str, task: str = "t", attempt: int = 1, *files: str) -> Path:
    d = work / run / task / str(attempt)
    d.mkdir(parents=True)
    for name in ("inputs.json", "stdout.log", *files):
        (d / name).write_bytes(b"x")
    return d


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and of everything under it ``seconds`` into the past."""
    then = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.utime(os.path.join(root, name), (then, then))
        os.utime(root, (then, then))


def _sweep(work: Path, in_use=lambda: set(), retention: float = HOUR) -> int:
    return asyncio.run(WorkDirCleaner(work, retention, in_use).sweep())


def test_a_run_unchanged_for_the_retention_is_removed_and_others_stay(tmp_path):
    _attempt(tmp_path, OLD)
    _attempt(tmp_path, YOUNG)
    _age(tmp_path / OLD, 2 * HOUR)
    (tmp_path / "node-id").write_text("abc")
    (tmp_path / ".status-removed-on-ack").touch()
    assert _sweep(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".status-removed-on-ack",
        YOUNG,
        "node-id",
    ]


def test_a_recent_change_deep_in_an_old_run_keeps_it(tmp_path):
    d = _attempt(tmp_path, RUN)
    _age(tmp_path / RUN, 2 * HOUR)
    os.utime(d / "stdout.log")  # its last log line was written just now
    assert _sweep(tmp_path) == 0
    assert d.exists()


@pytest.mark.parametrize("keep", ["status.pb", "process.json"])
def test_an_old_run_with_a_kept_report_or_a_process_record_stays(tmp_path, keep):
    _attempt(tmp_path, RUN, "t", 2, keep)
    _age(tmp_path / RUN, 2 * HOUR)
    assert _sweep(tmp_path) == 0
    assert (tmp_path / RUN / "t" / "2" / keep).exists()


def test_a_task_output_named_like_a_record_does_not_keep_its_run(tmp_path):
    d = _attempt(tmp_path, RUN)
    (d / "results").mkdir()
    (d / "results" / "status.pb").write_bytes(b"the task's own file")
    _age(tmp_path / RUN, 2 * HOUR)
    assert _sweep(tmp_path) == 1


def test_runs_in_use_stay_including_one_assigned_during_the_scan(tmp_path):
    for run in (RUNNING, ASSIGNED_MEANWHILE, DONE):
        _attempt(tmp_path, run)
        _age(tmp_path / run, 2 * HOUR)
    calls = iter([{RUNNING}, {ASSIGNED_MEANWHILE}])
    assert _sweep(tmp_path, in_use=lambda: next(calls)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ASSIGNED_MEANWHILE, RUNNING])


def test_only_directories_named_like_run_ids_are_removed(tmp_path):
    for name in ("datasets", "0000000000AA00000001", "0000000000aa0000001"):
        _attempt(tmp_path, name)
        _age(tmp_path / name, 2 * HOUR)
    assert _sweep(tmp_path) == 0
    assert len(list(tmp_path.iterdir())) == 3


def test_run_ids_are_what_the_cleaner_looks_for():
    assert re.fullmatch(RUN_ID_PATTERN, new_run_id())


def test_a_removal_cut_short_is_finished_by_the_next_sweep(tmp_path):
    # Left by an earlier sweep that could not finish, under the name of a run due again.
    left = tmp_path / f"{REMOVING_PREFIX}{RUN}-1"
    _attempt(tmp_path, left.name)
    _attempt(tmp_path, RUN)
    _age(tmp_path / RUN, 2 * HOUR)
    (tmp_path / ".hidden").mkdir()
    assert _sweep(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden"]


def test_a_missing_work_dir_is_nothing_to_sweep(tmp_path):
    assert _sweep(tmp_path / "not-yet") == 0


def test_sweeps_come_at_a_quarter_of_the_retention_within_bounds():
    assert sweep_interval(0.1) == 0.2
    assert sweep_interval(40.0) == 10.0
    assert sweep_interval(7 * 24 * HOUR) == HOUR


def test_a_negative_retention_is_refused(tmp_path):
    with pytest.raises(ValueError, match="work_retention"):
        AgentConfig(node="n1", work_dir=tmp_path, work_retention=-1)


def test_what_the_agent_may_not_delete_goes_to_the_runtime(tmp_path, monkeypatch):
    # As a non-root agent under the docker runtime: its own deletion leaves a root
    # container's directory behind; the runtime deletes that as root, then the agent the rest.
    import tether.agent.retention as retention

    real = retention._remove
    tries: list[str] = []

    def remove(path: Path, warn: bool = True) -> bool:
        tries.append(path.name)
        if (path / "t" / "1" / "root-owned").exists():
            return False
        return real(path, warn)

    helped: list[str] = []

    async def remove_tree(path: Path) -> bool:
        helped.append(path.name)
        (path / "t" / "1" / "root-owned").unlink()
        return True

    monkeypatch.setattr(retention, "_remove", remove)
    _attempt(tmp_path, RUN, "t", 1, "root-owned")
    _age(tmp_path / RUN, 2 * HOUR)
    cleaner = WorkDirCleaner(tmp_path, HOUR, lambda: set(), remove_tree)
    assert asyncio.run(cleaner.sweep()) == 1
    assert list(tmp_path.iterdir()) == []
    assert len(helped) == 1 and helped[0].startswith(f"{REMOVING_PREFIX}{RUN}-")
    assert tries == [helped[0], helped[0]]


def test_a_runtime_that_fails_to_help_leaves_the_run_for_the_next_sweep(tmp_path, monkeypatch):
    import tether.agent.retention as retention

    monkeypatch.setattr(retention, "_remove", lambda path, warn=True: False)

    async def remove_tree(path: Path) -> bool:
        raise OSError("engine away")

    _attempt(tmp_path, RUN)
    _age(tmp_path / RUN, 2 * HOUR)
    cleaner = WorkDirCleaner(tmp_path, HOUR, lambda: set(), remove_tree)
    assert asyncio.run(cleaner.sweep()) == 0
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(REMOVING_PREFIX)  # found again by the next sweep
