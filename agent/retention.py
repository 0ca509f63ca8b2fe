"""Removes old run directories from the agent's work dir (``work_retention``).

An attempt's directory keeps its output and logs after the attempt ends, for ``tether logs``
and for whoever looks on the node; with no limit a busy node's disk fills up. A run's
directory ``<work_dir>/<run>/`` is removed once nothing in it has changed for the retention
period, no attempt of the run is running here or waiting for its report's acknowledgement,
and none of its attempt directories holds a runtime record or a kept report (``process.json``,
``status.pb``): those are work a restarted agent must still find. Only directories named like
a run id are considered, so nothing else kept in a shared work dir is touched.

A run is first renamed out of the way (``.removing-<run>-<n>``), in the event loop right after
the check that it is not in use, so that an attempt assigned to it later starts in a fresh
directory; the tree is then deleted in a thread of its own (a big run's deletion must neither
hold up the loop's shared executor nor the agent's exit). A removal cut short, by a crash or
by files the agent may not delete, is tried again by the next sweep.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tether.agent import layout
from tether.agent.runtimes.process import PROCESS_FILE
from tether.agent.runtimes.threads import in_thread
from tether.sdk.constants import RUN_ID_PATTERN
from tether.sdk.telemetry import get_logger

__all__ = ["REMOVING_PREFIX", "WorkDirCleaner", "sweep_interval"]

log = get_logger("agent.retention")

# A run directory being removed; names starting with a dot are never run ids.
REMOVING_PREFIX = ".removing-"
_RUN_DIR = re.compile(RUN_ID_PATTERN)
# Files of an attempt directory that mark it as still needed (see the module docstring).
_KEEP_FILES = frozenset({PROCESS_FILE, layout.STATUS_FILE})


def sweep_interval(retention: float) -> float:
    """Seconds between sweeps: a quarter of the retention, at least 0.2 s and at most an hour."""
    return min(max(retention / 4, 0.2), 3600.0)


class WorkDirCleaner:
    """Sweeps ``work_dir`` for run directories older than ``retention`` seconds.

    Args:
        work_dir: The agent's work dir.
        retention: Seconds since a run's directory last changed before it is removed (> 0).
        in_use: The run ids with attempts running here, reports not yet acknowledged, or
            attempts assigned since the previous call (:meth:`Runner.runs_in_use`).
    """

    def __init__(
        self,
        work_dir: Path,
        retention: float,
        in_use: Callable[[], set[str]],
        remove_tree: Callable[[Path], Awaitable[bool]] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.retention = retention
        self.in_use = in_use
        # The runtime's help with what this agent's user may not delete (docker: as root).
        self.remove_tree = remove_tree
        self.removed = 0  # run directories removed so far

    async def run(self) -> None:
        """Sweep now and then every :func:`sweep_interval`, until cancelled."""
        interval = sweep_interval(self.retention)
        while True:
            try:
                await self.sweep()
            except Exception as e:  # a full disk or a vanished dir: try again next time
                log.warning("work dir sweep failed", error=str(e))
            await asyncio.sleep(interval)

    async def sweep(self) -> int:
        """Remove what is due now; return how many run directories were removed."""
        cutoff = time.time() - self.retention
        busy = self.in_use()
        candidates, leftovers = await in_thread(
            _old_runs, self.work_dir, cutoff, busy, name="tether-work-dir-scan"
        )
        # Asked again with no await before the renames: runs given an attempt during the scan
        # are in use too, and an attempt assigned after its run's rename gets a new directory.
        busy |= self.in_use()
        renamed: list[Path] = []
        for name in candidates:
            if name in busy:
                continue
            target = self.work_dir / f"{REMOVING_PREFIX}{name}-{time.time_ns()}"
            try:
                os.rename(self.work_dir / name, target)
            except OSError as e:
                log.warning("cannot remove run directory", run_id=name, error=str(e))
                continue
            renamed.append(target)
        for path in leftovers:
            await self._delete(path)
        count = 0
        for target in renamed:
            if await self._delete(target):
                count += 1
        if count:
            self.removed += count
            log.info("removed old run directories", count=count, work_dir=str(self.work_dir))
        return count

    async def _delete(self, path: Path) -> bool:
        """Delete the tree ``path``, with the runtime's help where the agent's user may not;
        whether it is all gone (what is left is tried again by the next sweep)."""
        helper = self.remove_tree
        if await in_thread(_remove, path, helper is None, name="tether-work-dir-remove"):
            return True
        if helper is None:
            return False
        try:
            helped = await helper(path)
        except Exception as e:  # the engine away, say: the sweep after next tries again
            log.warning(
                "the runtime could not delete a run directory", path=str(path), error=str(e)
            )
            helped = False
        if not helped:
            log.debug("the runtime did not help remove a run directory", path=str(path))
        return await in_thread(_remove, path, True, name="tether-work-dir-remove")


def _remove(path: Path, warn: bool = True) -> bool:
    """Delete the tree ``path``; whether it is all gone. ``warn``: log what could not be
    deleted (a container's files the agent's user may not delete, say)."""
    errors: list[str] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda _fn, p, exc: errors.append(f"{p}: {exc}"))
    else:
        shutil.rmtree(path, onerror=lambda _fn, p, exc: errors.append(f"{p}: {exc[1]}"))
    if errors and warn:
        log.warning(
            "cannot delete all of a run directory",
            path=str(path),
            errors=len(errors),
            first=errors[0],
        )
    return not errors


def _old_runs(work_dir: Path, cutoff: float, busy: set[str]) -> tuple[list[str], list[Path]]:
    """The run directories due for removal, and removals left unfinished earlier."""
    due: list[str] = []
    leftovers: list[Path] = []
    try:
        entries = list(os.scandir(work_dir))
    except FileNotFoundError:
        return due, leftovers
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith(REMOVING_PREFIX):
            leftovers.append(Path(entry.path))
        elif _RUN_DIR.fullmatch(entry.name) and entry.name not in busy:
            if _unchanged_since(entry.path, cutoff):
                due.append(entry.name)
    return due, leftovers


def _unchanged_since(run_dir: str, cutoff: float) -> bool:
    """Whether nothing in ``run_dir`` (its task and attempt directories and their files)
    changed after ``cutoff``, and no attempt directory in it keeps a record a restarted agent
    needs."""
    if os.stat(run_dir).st_mtime > cutoff:
        return False  # the common case of a recent run: one stat
    top = run_dir.count(os.sep)
    for root, dirs, files in os.walk(run_dir):
        # <run>/<task>/<attempt>: only there are the agent's own files (a task's outputs
        # deeper down may have any name).
        if root.count(os.sep) - top == 2 and _KEEP_FILES.intersection(files):
            return False
        for name in (*dirs, *files):
            try:
                if os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime > cutoff:
                    return False
            except FileNotFoundError:
                continue
        if os.stat(root).st_mtime > cutoff:
            return False
    return True
