"""Starting a task's process with less work per child than ``subprocess.Popen``.

Popen's Python half costs the agent about as much CPU as the spawn itself: it encodes the
whole environment again for every child (two ``os.fsencode`` calls per variable), builds and
checks its arguments, keeps a lock and finalizer per object. :func:`spawn` makes the same
``_posixsubprocess.fork_exec`` call Popen makes (vfork and exec, a new session, stdin/out/err
from the given fds, every other fd closed) from an environment already encoded, and reports
a failed exec or chdir as the same ``OSError`` Popen raises. ``fork_exec`` is CPython's
private helper: its signature is known for 3.11 to 3.13, and on any other version
:func:`spawn` uses Popen, which is slower but the same to a task.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["Child", "popen_child", "spawn"]

try:
    from _posixsubprocess import fork_exec as _fork_exec
except ImportError:  # not CPython on a POSIX system
    _fork_exec = None

# The 23-argument form (…, preexec_fn, allow_vfork) of CPython 3.11 to 3.13.
_FAST = _fork_exec is not None and (3, 11) <= sys.version_info[:2] <= (3, 13)


class Child:
    """A started child process: its pid, and its exit code once reaped (``poll``/``wait``).

    ``returncode`` follows Popen's convention: negative is the signal that killed it.
    """

    __slots__ = ("_popen", "pid", "returncode")

    def __init__(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._popen = popen

    def _reaped(self, status: int) -> int:
        self.returncode = (
            -os.WSTOPSIG(status) if os.WIFSTOPPED(status) else os.waitstatus_to_exitcode(status)
        )
        return self.returncode

    def poll(self) -> int | None:
        """Reap the child if it has ended; its exit code, or None while it runs."""
        if self.returncode is not None:
            return self.returncode
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped elsewhere (SIGCHLD ignored): its code is lost, and Popen says 0.
            self.returncode = 0
            return self.returncode
        return self._reaped(status) if pid == self.pid else None

    def wait(self) -> int:
        """Block until the child ends (from a thread: see ``children.exit_of``)."""
        if self.returncode is not None:
            return self.returncode
        if self._popen is not None:
            self.returncode = self._popen.wait()
            return self.returncode
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            self.returncode = 0  # as poll()
            return self.returncode
        return self._reaped(status)


def spawn(
    args: Sequence[str],
    executable: str,
    env: list[bytes],
    *,
    cwd: str,
    stdin: int,
    stdout: int,
    stderr: int,
) -> Child:
    """Start ``args`` (``executable`` is the program's path) in a new session.

    Args:
        env: The whole environment, as ``b"KEY=VALUE"`` items.
        cwd: The child's working directory.
        stdin, stdout, stderr: File descriptors the child gets as 0, 1 and 2.

    Raises:
        OSError: The program could not be executed, or ``cwd`` entered (as Popen raises it).
        ValueError: A NUL byte in an argument or the environment.
    """
    if not _FAST:
        return popen_child(
            args, executable, env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr
        )
    errpipe_read, errpipe_write = os.pipe()
    try:
        try:
            pid = _fork_exec(
                args,
                (os.fsencode(executable),),
                True,  # close every other fd in the child
                (errpipe_write,),
                cwd,
                env,
                stdin,
                -1,
                -1,
                stdout,
                -1,
                stderr,
                errpipe_read,
                errpipe_write,
                True,  # restore signals, as Popen does
                True,  # setsid: the task's own process group, signalled as one
                -1,
                None,
                None,
                None,
                -1,
                None,
                True,  # vfork: the agent's memory is not copied for each child
            )
        finally:
            os.close(errpipe_write)
        # The write end closes on exec: empty means the program runs (with vfork it has
        # exec'd by the time fork_exec returns, so this does not wait).
        data = os.read(errpipe_read, 50000)
    finally:
        os.close(errpipe_read)
    if data:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise _child_error(data, executable, cwd)
    return Child(pid)


def _child_error(data: bytes, executable: str, cwd: str) -> Exception:
    """The exception the child reported (``NAME:HEX_ERRNO:MESSAGE``), as Popen builds it."""
    try:
        name, hex_errno, message = data.split(b":", 2)
        text = message.decode()
    except ValueError:
        return subprocess.SubprocessError(f"bad exception data from child: {data!r}")
    cls = getattr(builtins, name.decode("ascii", "replace"), subprocess.SubprocessError)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = subprocess.SubprocessError
    if issubclass(cls, OSError) and hex_errno:
        errno_num = int(hex_errno, 16)
        # The child failed before exec: in chdir(cwd) ("noexec" up to 3.12, "noexec:chdir"
        # from 3.13, where a bare "noexec" names no file).
        if text == "noexec:chdir" or (text == "noexec" and sys.version_info < (3, 13)):
            filename: str | None = cwd
        elif text == "noexec":
            filename = None
        else:
            filename = executable
        return cls(errno_num, os.strerror(errno_num) if errno_num else "", filename)
    return cls(text)


def popen_child(
    args: Sequence[str],
    executable: str | None,
    env: list[bytes],
    *,
    cwd: str,
    stdin: int,
    stdout: int,
    stderr: int,
) -> Child:
    """:func:`spawn` through ``subprocess.Popen``; ``executable`` None searches the PATH of
    ``env`` for ``args[0]``, as Popen does."""
    environ = dict(item.split(b"=", 1) for item in env)
    proc = subprocess.Popen(
        list(args),
        executable=executable,
        env=environ,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    return Child(proc.pid, proc)
