"""The reaper: a small process that stops an agent's tasks when the agent dies.

A task of the ``process`` runtime is a child of its agent. If the agent is SIGKILLed (or
crashes), its children are re-parented to init and run on, while the controller, rightly,
runs their attempts again elsewhere once the node's lease expires: the task would run twice at
once. The reaper closes that gap. The agent starts one reaper and tells it, over the reaper's
stdin, each task's process group as it starts (``+PID STARTTIME``, or ``+PID``: the reaper then
reads the start time itself) and ends (``-PID``). The
pipe closes when the agent dies, however it dies, and the reaper then stops every group it was
told of (SIGTERM, then SIGKILL after a short grace) and exits.

The reaper is woken by the pipe's hang-up only, and otherwise reads what has piled up every
:data:`READ_EVERY` seconds: at hundreds of attempts a second, a wake-up per line would cost the
agent a context switch per write. A line in the pipe is as good as a line read, since every
line is read before the groups are stopped.

Run as ``python -m tether.agent.runtimes.reaper``; the start time (from ``/proc``) guards
against a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

__all__ = ["GRACE", "READ_EVERY", "alive", "group_alive", "main", "start_ticks", "stop_groups"]

# SIGTERM-to-SIGKILL grace once the agent is gone: short, since the controller will run these
# attempts elsewhere, and they must be gone before it does.
GRACE = 0.5
# How often the lines in the pipe are read while the agent lives, seconds; the agent's writes
# block once the pipe is full, so at 1,000 attempts/s (about 40 kB/s) this must stay well under
# the time a full pipe takes to fill.
READ_EVERY = 0.2


def _stat(pid: int) -> list[bytes]:
    """Fields 3 on of /proc/PID/stat (state first); empty when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return stat[stat.rindex(b")") + 2 :].split()


def start_ticks(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, field 22 of /proc/PID/stat);
    0 when there is no such process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else 0


def alive(pid: int, ticks: int) -> bool:
    """Whether ``pid`` is still the process that started at ``ticks`` (and not a zombie)."""
    fields = _stat(pid)
    return bool(fields) and int(fields[19]) == ticks and fields[0] != b"Z"


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member this process may signal."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_groups(groups: dict[int, int], grace: float = GRACE) -> None:
    """SIGTERM each group whose leader is still the task's, then SIGKILL what is left of
    those groups after ``grace``.

    The leader is checked once, before the first signal: a shell that leads a task dies of
    the SIGTERM at once while its children (same group) may take their time, and they must
    not outlive the grace. The group id cannot name another group meanwhile: Linux does not
    give out a number still in use as a process group's id.
    """
    live = [pid for pid, ticks in groups.items() if alive(pid, ticks)]
    for pgid in live:
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(g) for g in live):
        time.sleep(0.02)
    for pgid in live:
        if group_alive(pgid):
            _signal(pgid, signal.SIGKILL)


def _apply(line: bytes, groups: dict[int, int]) -> None:
    parts = line.split()
    try:
        if line.startswith(b"+") and len(parts) == 2:
            groups[int(parts[0][1:])] = int(parts[1])
        elif line.startswith(b"+") and len(parts) == 1:
            # Read within READ_EVERY of the start: a task that ended before is gone (0), and
            # its pid is not reused that soon.
            pid = int(parts[0][1:])
            if ticks := start_ticks(pid):
                groups[pid] = ticks
        elif line.startswith(b"-") and len(parts) == 1:
            groups.pop(int(parts[0][1:]), None)
    except ValueError:
        pass


def _read_available(fd: int, groups: dict[int, int], rest: bytes) -> tuple[bytes, bool]:
    """Apply every whole line now in the pipe; return the partial last line and whether the
    agent has closed its end."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return rest, False
        if not data:
            return rest, True
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            _apply(line, groups)


def main() -> None:
    # The agent's terminal or service manager may signal the whole session; the reaper must
    # outlive the agent to do its job, and ends by itself when the agent's pipe closes.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: dict[int, int] = {}
    if not hasattr(select, "epoll"):
        for line in sys.stdin.buffer:
            _apply(line, groups)
        stop_groups(groups)
        return
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    ep = select.epoll()
    ep.register(fd, 0)  # no EPOLLIN: only the hang-up (and errors) wake the reaper
    rest, closed = b"", False
    while not closed:
        ep.poll(READ_EVERY)
        rest, closed = _read_available(fd, groups, rest)
    _apply(rest, groups)
    stop_groups(groups)


if __name__ == "__main__":
    main()
