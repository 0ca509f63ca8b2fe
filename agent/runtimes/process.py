"""The ``process`` runtime: each attempt is a plain subprocess in its own process group.

Tasks die with their agent: a reaper process (:mod:`tether.agent.runtimes.reaper`) stops
their process groups when the agent's pipe to it closes, however the agent ended. With
``leave_running`` they are left for the next agent instead: their output goes straight to the
log files (the log limit is not applied then) and a shell records their exit code, so that an
agent restarted with the same work dir adopts them. Such an attempt's process (pid and
start time, against pid reuse) is recorded in ``process.json`` in its directory, from which a
restarted agent adopts it while it runs or reports it once ended; the controller decides
which are current and has the others stopped. Tasks that die with their agent need no such
record: a restarted agent reports those whose final report was kept (``status.pb``, removed
once acknowledged) and the controller runs the rest again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import ExitStatus, LaunchSpec, RecoveredTask, RuntimeError_
from tether.agent.runtimes.capped_log import CappedLog
from tether.agent.runtimes.children import FdWatch, PipeCopies, exit_of
from tether.agent.runtimes.reaper import alive, group_alive, start_ticks
from tether.agent.runtimes.spawn import Child, popen_child, spawn
from tether.api.v1 import agent_pb2
from tether.sdk.telemetry import get_logger

__all__ = ["ProcessRuntime"]

# After the task exits, what is left in its pipes is read at once; only a background child that
# inherited them and lives on keeps them open. Stop reading after this long so that such a child
# cannot hold the attempt open.
_DRAIN_GRACE = 1.0
PROCESS_FILE = "process.json"
EXIT_FILE = "exit_code"
# In the work dir: this agent removes each status.pb once acknowledged, so one found without
# a process.json is a report to send. Agents before it left acknowledged ones behind; where
# the marker is missing, recovery takes those for what they are and removes them.
REPORTS_MARKER = ".status-removed-on-ack"
# Runs the task and records its exit code, for an agent that adopts it later.
_RECORD_EXIT = 'trap "" HUP; "$@"; c=$?; echo $c > "$0.tmp" && mv "$0.tmp" "$0"; exit $c'

_REAPER_PIPE_BYTES = 1 << 20
# How long where a program was found in PATH is reused, seconds. Popen would otherwise search
# PATH in Python for every attempt, and the child try an execve in each directory before the
# right one while the agent waits for it (vfork); a program installed meanwhile in an earlier
# directory is used once this has passed.
_RESOLVE_TTL = 1.0
# Every task's stdin, opened once for the process (Popen's DEVNULL opens and closes it for
# each child).
_STDIN = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
log = get_logger("agent.runtime")


def _exit_status(code: int) -> ExitStatus:
    if code < 0:
        return ExitStatus(128 - code, "signal", f"killed by {signal.Signals(-code).name}")
    if code > 128 and code - 128 in signal.valid_signals():
        # A shell's report of a signal death (leave_running's wrapper).
        return ExitStatus(code, "signal", f"killed by {signal.Signals(code - 128).name}")
    return ExitStatus(code)


def _signal_group(pid: int, sig: int) -> None:
    # The whole group, so that shells and their children stop too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class _ProcessHandle:
    def __init__(
        self,
        proc: Child,
        exited: asyncio.Future,
        copies: PipeCopies | None,
        attempt_dir: str | Path,
        ended=lambda: None,
    ) -> None:
        # Only a task left running for the next agent has a record to remove (process.json).
        self.needs_remove = copies is None
        self._proc = proc
        self._exited = exited
        self._copies = copies
        self._dir = attempt_dir
        self._ended = ended
        exited.add_done_callback(lambda _f: ended())

    @property
    def exit_future(self) -> asyncio.Future:
        """Done when the task has exited (``wait`` then returns without waiting for it)."""
        return self._exited

    async def wait(self) -> ExitStatus:
        code = await asyncio.shield(self._exited)
        await self._drain()
        status = _exit_status(code)
        if self._copies is not None and not self._copies.printed:
            status = ExitStatus(status.exit_code, status.reason, status.message, printed=False)
        return status

    async def _drain(self) -> None:
        if self._copies is None:  # leave_running: the task writes its log files itself
            return
        self._copies.pump()
        if not self._copies.done.done():
            await asyncio.wait({self._copies.done}, timeout=_DRAIN_GRACE)
        self._copies.close()

    async def stop(self, grace: float) -> None:
        if self._exited.done():
            return
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        await asyncio.wait({self._exited}, timeout=grace)
        # The leader (often a shell) may die of the SIGTERM at once while the rest of its
        # group takes its time: the whole group gets the grace, then SIGKILL. (The group id
        # names no other group meanwhile: Linux does not reuse one still in use.)
        while group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        await asyncio.shield(self._exited)

    async def remove(self) -> None:
        _forget(self._dir, exit_file=self._copies is None)


class _AdoptedHandle:
    """A task a previous agent started: not our child, so watched through /proc."""

    def __init__(self, pid: int, ticks: int, attempt_dir: Path) -> None:
        self._pid = pid
        self._ticks = ticks
        self._dir = attempt_dir

    @property
    def dir(self) -> Path:
        """The attempt's directory."""
        return self._dir

    async def wait(self) -> ExitStatus:
        while alive(self._pid, self._ticks):
            await asyncio.sleep(0.1)
        try:
            return _exit_status(int((self._dir / EXIT_FILE).read_text()))
        except (OSError, ValueError):
            return ExitStatus(
                -1, "lost", "the task ended while no agent watched it; its exit code is unknown"
            )

    async def stop(self, grace: float) -> None:
        if not alive(self._pid, self._ticks):
            return
        _signal_group(self._pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        # The whole group, not only its leader (see _ProcessHandle.stop).
        while group_alive(self._pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if group_alive(self._pid):
            _signal_group(self._pid, signal.SIGKILL)

    async def remove(self) -> None:
        _forget(self._dir)


def _forget(attempt_dir: str | Path, exit_file: bool = True) -> None:
    """The controller has the attempt's result: a restarted agent must not find it again.

    ``exit_file``: remove the exit code too (only tasks started with leave_running have one).
    """
    for name in (PROCESS_FILE, EXIT_FILE) if exit_file else (PROCESS_FILE,):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{attempt_dir}/{name}")


class ProcessRuntime:
    """Runs tasks as subprocesses of the agent: for development and container-less nodes.

    Resources are accounted by the scheduler but not enforced; ``image`` is ignored.
    The task's stdout and stderr go through the agent into the attempt's log files (created
    by the first output), which stop at ``LaunchSpec.log_limit_bytes`` each (with
    ``leave_running``, straight into the files, without the limit). Tasks die with the agent
    unless it runs with ``leave_running``.
    """

    name = "process"

    def __init__(self, config: AgentConfig | None = None) -> None:
        self.config = config or AgentConfig()
        self._reaper: subprocess.Popen | None = None
        # Lines for the reaper, written together at the end of the loop's turn: one write
        # (and one wake-up of the reaper) for all the attempts that started or ended in it.
        self._reaper_lines: list[bytes] = []
        # The agent's environment as bytes, taken once: decoding and re-encoding os.environ
        # for every attempt costs more than the spawn itself.
        self._environ = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
        self._environ_items = [k + b"=" + v for k, v in self._environ.items()]
        # Variable name -> (b"NAME=", whether the agent's environment has it).
        self._env_prefixes: dict[str, tuple[bytes, bool]] = {}
        # (program, PATH) -> (its path, when it was found)
        self._resolved: dict[tuple[str, bytes | None], tuple[str, float]] = {}
        self._marked = False  # the work dir holds REPORTS_MARKER
        # The children's pidfds and pipes, watched on the loop that starts them.
        self._watch: FdWatch | None = None

    def task_path(self, host_path: str | Path) -> str:
        return os.fspath(host_path)

    def _tell_reaper(self, line: str, now: bool = False) -> None:
        """Queue ``line`` for the reaper; ``now``: write it (and what is queued) at once."""
        if self.config.leave_running:
            return
        if now:
            # A new child is told at once: killed between its spawn and the end of this turn,
            # the agent would leave a child that the reaper never heard of and that no
            # restarted agent adopts (its record has no start time), and it could run on
            # beside the attempt's next copy.
            self._reaper_lines.append(line.encode() + b"\n")
            self._flush_reaper()
            return
        if not self._reaper_lines:
            try:
                asyncio.get_running_loop().call_soon(self._flush_reaper)
            except RuntimeError:  # no loop (the runtime is closing): write at once
                self._reaper_lines.append(line.encode() + b"\n")
                self._flush_reaper()
                return
        self._reaper_lines.append(line.encode() + b"\n")

    def _flush_reaper(self) -> None:
        lines, self._reaper_lines = self._reaper_lines, []
        if not lines:
            return
        data = b"".join(lines)
        # A dead reaper shows as a broken pipe on the write (there is no other reader), so it
        # is not polled for at every flush, twice per attempt.
        for _ in range(2):
            if self._reaper is None:
                self._reaper = self._start_reaper()
            assert self._reaper.stdin is not None
            try:
                self._reaper.stdin.write(data)
                self._reaper.stdin.flush()
                return
            except BrokenPipeError:
                # The groups it knew of may outlive a crashed agent; a new one is told these.
                log.warning("task reaper died; tasks may outlive a crashed agent")
                with contextlib.suppress(OSError):
                    self._reaper.stdin.close()
                # Its pipe may close a moment before it is a zombie to reap.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._reaper.wait(timeout=0.1)
                self._reaper = None

    @staticmethod
    def _start_reaper() -> subprocess.Popen:
        reaper = subprocess.Popen(
            [sys.executable, "-m", "tether.agent.runtimes.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Room for a few seconds of lines: the reaper reads them in bulk (reaper.READ_EVERY).
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(reaper.stdin.fileno(), fcntl.F_SETPIPE_SZ, _REAPER_PIPE_BYTES)
        return reaper

    async def close(self) -> None:
        """Let the reaper go (the agent is stopping and has stopped its tasks)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._flush_reaper()
        if self._reaper is not None and self._reaper.stdin is not None:
            self._reaper.stdin.close()
            await asyncio.to_thread(self._reaper.wait)
            self._reaper = None

    def _fd_watch(self) -> FdWatch:
        if self._watch is None or self._watch.loop is not asyncio.get_running_loop():
            if self._watch is not None and not self._watch.loop.is_closed():
                self._watch.close()
            self._watch = FdWatch()
        return self._watch

    def _env(self, extra: dict[str, str]) -> list[bytes]:
        """The task's whole environment as ``KEY=VALUE`` items: the agent's, then ``extra``."""
        items = []
        replaces = False
        prefixes = self._env_prefixes
        for k, v in extra.items():
            known = prefixes.get(k)
            if known is None:  # the same few names come with every attempt: encoded once
                key = os.fsencode(k)
                if b"=" in key:
                    raise ValueError(f"illegal environment variable name {k!r}")
                known = (key + b"=", key in self._environ)
                if len(prefixes) < 1024:
                    prefixes[k] = known
            replaces = replaces or known[1]
            items.append(known[0] + v.encode(_FS_ENCODING, _FS_ERRORS))  # as os.fsencode
        if not replaces:  # the usual case: the agent's items as they are, the task's after
            return self._environ_items + items
        env = self._environ.copy()
        for item in items:
            key, _, value = item.partition(b"=")
            env[key] = value
        return [k + b"=" + v for k, v in env.items()]

    def _which(self, program: str, path: bytes | None) -> str | None:
        """Where ``program`` is in the task's PATH (None: let Popen search, or fail)."""
        if "/" in program or not program:
            return None
        key = (program, path)
        now = time.monotonic()
        hit = self._resolved.get(key)
        if hit is not None and now - hit[1] < _RESOLVE_TTL:
            return hit[0]
        found = shutil.which(program, path=os.fsdecode(path) if path is not None else os.defpath)
        if found is None:
            self._resolved.pop(key, None)
            return None
        if len(self._resolved) > 256:  # many distinct programs: start afresh
            self._resolved.clear()
        self._resolved[key] = (found, now)
        return found

    def _spawn(self, command: list[str], env: list[bytes], path: bytes | None, **kwargs) -> Child:
        program = command[0] if command else ""
        found = program if "/" in program else self._which(program, path)
        if found is not None:
            try:
                return spawn(command, found, env, **kwargs)
            except OSError:
                if found is program:
                    raise
                # Moved or replaced since it was found: the full search decides, and says why.
                self._resolved.clear()
        return popen_child(command, None, env, **kwargs)

    async def start(self, spec: LaunchSpec) -> _ProcessHandle:
        self._mark_work_dir()
        cwd = spec.working_dir or str(spec.attempt_dir)
        leave = self.config.leave_running
        command = list(spec.command)
        if leave:
            command = ["/bin/sh", "-c", _RECORD_EXIT, f"{spec.attempt_dir}/{EXIT_FILE}", *command]
        logs: list[CappedLog] = []
        pipes: list[tuple[int, int]] = []
        try:
            env = self._env(spec.env)
            task_path = spec.env.get("PATH")
            search = os.fsencode(task_path) if task_path is not None else self._environ.get(b"PATH")
            if leave:
                outputs = [
                    os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                    for p in (spec.stdout_path, spec.stderr_path)
                ]
            else:
                # Each log is created by the first output (an earlier try's was removed
                # when the attempt was staged).
                for stream, path in (("stdout", spec.stdout_path), ("stderr", spec.stderr_path)):
                    logs.append(
                        CappedLog(path, spec.log_limit_bytes, _truncation_reporter(spec, stream))
                    )
                # Our own pipes, read from the loop: a background child of the task that keeps
                # them open must not hold up the attempt's end (see _DRAIN_GRACE).
                pipes = [os.pipe(), os.pipe()]
                outputs = [w for _, w in pipes]
        except (OSError, ValueError) as e:
            _close_all(pipes, logs)
            if isinstance(e, ValueError):  # a NUL byte in the environment
                raise RuntimeError_(f"cannot start {spec.command[0]!r}: {e}") from e
            raise RuntimeError_(f"cannot create the attempt's log files or pipes: {e}") from e
        try:
            proc = self._spawn(
                command,
                env,
                search,
                cwd=cwd,
                stdin=_STDIN,
                stdout=outputs[0],
                stderr=outputs[1],
            )
        except BaseException as e:
            # Whatever stopped the start (a missing program, a NUL byte in an argument), the
            # read ends and log files must not leak.
            for r, _ in pipes:
                os.close(r)
            for log_ in logs:
                log_.close()
            if not isinstance(e, OSError | ValueError):
                raise
            if isinstance(e, OSError) and spec.working_dir and e.filename == cwd:
                # The child could not enter the directory: the program was never tried.
                raise RuntimeError_(f"cannot enter working_dir {cwd!r}: {e.strerror or e}") from e
            what = e.strerror if isinstance(e, FileNotFoundError) else e
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {what}") from e
        finally:
            for w in outputs:
                os.close(w)  # the child has its copies; ours would keep the pipes open
        # Only a task left running is adopted, and needs a record of its process. A child's
        # /proc stat is slow to read while it execs (about 0.1 ms CPU and 0.7 ms waiting,
        # against 0.02 ms later): the reaper reads the start time of the others when it
        # reads their line.
        if leave:
            _record(spec, proc.pid, start_ticks(proc.pid))
        self._tell_reaper(f"+{proc.pid}", now=True)
        copies = (
            None
            if leave
            else PipeCopies(
                [(r, log_) for (r, _), log_ in zip(pipes, logs, strict=True)],
                self._fd_watch(),
                _log_error_reporter(spec),
            )
        )
        return _ProcessHandle(
            proc,
            exit_of(proc, self._fd_watch()),
            copies,
            spec.attempt_dir,
            lambda: self._tell_reaper(f"-{proc.pid}"),
        )

    async def recover(self) -> list[RecoveredTask]:
        """The attempts a previous agent with this work dir left: live ones to adopt, and
        ended ones whose result is known (an exit code, or a final report not yet acked)."""
        self._mark_work_dir()
        found = self._recover_recorded()
        recorded = {t.handle.dir for t in found if isinstance(t.handle, _AdoptedHandle)}
        work_dir = self.config.work_dir
        for path in sorted(work_dir.glob(f"*/*/*/{layout.STATUS_FILE}")):
            d = path.parent
            if d in recorded:
                continue
            ref = _report_of(path, work_dir)
            if ref is None:
                # Cut short (the agent died while writing it) or not this attempt's: no
                # result to send; the controller runs the attempt again as lost.
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            labels = {
                layout.RUN_LABEL: ref.run_id,
                layout.TASK_LABEL: ref.task,
                layout.ATTEMPT_LABEL: str(ref.attempt),
            }
            # Its task died with its agent after the report was written: the report is the
            # result (pid 0 is never alive).
            found.append(
                RecoveredTask(labels=labels, handle=_AdoptedHandle(0, 0, d), running=False)
            )
        return found

    def _mark_work_dir(self) -> None:
        """Make sure the work dir holds :data:`REPORTS_MARKER`, before this runtime starts
        or recovers anything: without it, reports without a process.json were left by an
        agent that kept acknowledged ones, and are removed."""
        if self._marked:
            return
        self._marked = True  # once per runtime: later scans would take its own reports
        work_dir = self.config.work_dir
        marker = work_dir / REPORTS_MARKER
        if not marker.exists():
            for path in work_dir.glob(f"*/*/*/{layout.STATUS_FILE}"):
                if not (path.parent / PROCESS_FILE).exists():
                    with contextlib.suppress(OSError):
                        path.unlink()
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            # Touched at every start, so that a cleaner of old files in /tmp leaves it be.
            marker.touch()
        except OSError as e:
            log.warning("cannot mark the work dir", path=str(marker), error=str(e))

    def _recover_recorded(self) -> list[RecoveredTask]:
        found = []
        for path in sorted(self.config.work_dir.glob(f"*/*/*/{PROCESS_FILE}")):
            try:
                rec = json.loads(path.read_text())
                pid, ticks, labels = int(rec["pid"]), int(rec["ticks"]), dict(rec["labels"])
                started_at = float(rec.get("started_at", 0))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("unreadable process record", path=str(path), error=str(e))
                continue
            d = path.parent
            running = alive(pid, ticks)
            if not running and not ((d / EXIT_FILE).exists() or (d / layout.STATUS_FILE).exists()):
                # Died with its agent, result unknown: the controller finds the attempt gone
                # when this agent registers, and runs it again.
                _forget(d)
                continue
            found.append(
                RecoveredTask(
                    labels=labels,
                    handle=_AdoptedHandle(pid, ticks, d),
                    running=running,
                    started_at=started_at,
                )
            )
        return found


def _report_of(path: Path, work_dir: Path) -> agent_pb2.AttemptRef | None:
    """The attempt whose final report ``path`` holds, when it is that of the attempt
    directory it is in; None when it is unreadable, cut short or another's."""
    try:
        ref = agent_pb2.TaskStatus.FromString(path.read_bytes()).ref
    except (OSError, ValueError):
        return None
    if (
        not ref.run_id
        or layout.attempt_dir(work_dir, ref.run_id, ref.task, ref.attempt) != path.parent.absolute()
    ):
        return None
    return ref


def _close_all(pipes: list[tuple[int, int]], logs: list[CappedLog]) -> None:
    for r, w in pipes:
        os.close(r)
        os.close(w)
    for log_ in logs:
        log_.close()


def _record(spec: LaunchSpec, pid: int, ticks: int) -> None:
    """Write ``process.json``; ``ticks`` 0 marks a task never to adopt as running."""
    record = {"pid": pid, "ticks": ticks, "started_at": time.time(), "labels": spec.labels}
    d = str(spec.attempt_dir)
    tmp = f"{d}/{PROCESS_FILE}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
        finally:
            os.close(fd)
        os.replace(tmp, f"{d}/{PROCESS_FILE}")
    except OSError as e:  # the task runs on; only its adoption after a restart is lost
        log.warning("cannot record the task's process", path=str(tmp), error=str(e))


def _log_error_reporter(spec: LaunchSpec):
    # The logs are created by the task's first output, after the start: a failure then is an
    # event of the attempt (the task runs on, its output drained and dropped).
    on_event = spec.on_event
    if on_event is None:
        return None
    return lambda e: on_event("log_error", f"cannot write the attempt's log: {e}")


def _truncation_reporter(spec: LaunchSpec, stream: str):
    on_event = spec.on_event
    if on_event is None:
        return None
    limit = spec.log_limit_bytes
    return lambda: on_event(
        "log_truncated", f"{stream} reached the log limit of {limit} bytes; the rest was discarded"
    )
