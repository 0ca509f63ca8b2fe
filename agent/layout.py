"""How an attempt is identified on the node, shared by the runner and the runtimes.

Each attempt has its own directory ``<work_dir>/<run>/<task>/<attempt>/`` and carries labels
naming it. The directory is derived from those labels alone, so a restarted agent finds the
files of the work it recovers.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Literal

__all__ = [
    "ATTEMPT_LABEL",
    "DISPATCH_LABEL",
    "INPUTS_FILE",
    "NODE_LABEL",
    "OUTPUT_FILE",
    "RUN_LABEL",
    "STATUS_FILE",
    "STDERR_FILE",
    "STDOUT_FILE",
    "TASK_LABEL",
    "TIMEOUT_LABEL",
    "TRACEPARENT_LABEL",
    "attempt_dir",
    "attempt_relative",
    "open_task_file",
]

INPUTS_FILE = "inputs.json"
OUTPUT_FILE = "output.json"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
# The final report, as sent to the controller, kept until the controller acknowledges it.
STATUS_FILE = "status.pb"

RUN_LABEL = "tether.run"
TASK_LABEL = "tether.task"
ATTEMPT_LABEL = "tether.attempt"
NODE_LABEL = "tether.node"
# The task's timeout in seconds, so that a recovered attempt still honours it.
TIMEOUT_LABEL = "tether.timeout"
# The attempt span's context (the task's TRACEPARENT names it), and its parent's (the
# controller's dispatch span): a recovering agent records the attempt span under the same
# id when the agent that started it could not, so that the trace stays whole.
TRACEPARENT_LABEL = "tether.traceparent"
DISPATCH_LABEL = "tether.dispatch"

_DEPTH = 3  # run / task / attempt


def attempt_dir(work_dir: Path, run_id: str, task: str, attempt: int) -> Path:
    """The directory of one attempt (absolute, so that container engines can mount it)."""
    return work_dir.absolute() / run_id / task / str(attempt)


def attempt_relative(work_dir: Path, path: Path) -> Path:
    """``path`` relative to the attempt directory that holds it.

    Raises:
        ValueError: ``path`` is not inside an attempt directory of ``work_dir``.
    """
    parts = path.absolute().relative_to(work_dir.absolute()).parts
    if len(parts) <= _DEPTH:
        raise ValueError(f"{path} is not inside an attempt directory of {work_dir}")
    return Path(*parts[_DEPTH:])


_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_task_file(path: str | Path, mode: Literal["r", "w", "a"]) -> BinaryIO:
    """Open a file of an attempt directory, where the task itself may have put something
    else (a container writes there as another user): never through a symbolic link, never
    waiting on a FIFO or device. Unbuffered.

    ``"w"`` starts a new empty file, replacing whatever had the name; ``"a"`` appends to the
    regular file there (created if missing); ``"r"`` reads it.

    Raises:
        OSError: not a regular file (a link: ELOOP; anything else: EINVAL), or as open(2).
    """
    if mode == "r":
        fd = os.open(path, os.O_RDONLY | _SAFE)
    elif mode == "a":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _SAFE, 0o644)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:  # an earlier try's, or the task's: replaced, not followed
            os.unlink(path)
            fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb" if mode == "r" else "wb" if mode == "w" else "ab", buffering=0)
