"""Child processes watched from the event loop itself: their exits and their output pipes.

asyncio's own subprocess support (Python 3.11) waits for each child in a thread of its own,
and wraps each pipe in a transport, a protocol and a stream reader. At hundreds of attempts a
second the thread starts and the GIL handoffs they cause cost more than the spawns. Here a
child's exit is a readable pidfd (Linux 5.3+) and a pipe is a readable fd, all watched by one
:class:`FdWatch`: an epoll set of its own, registered on the loop once, so that a child's
three fds cost three epoll calls rather than three rounds of the loop's selector
bookkeeping. Without pidfds an exit falls back to a waiting thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
from collections.abc import Callable

from tether.agent.runtimes.capped_log import READ_SIZE, CappedLog
from tether.agent.runtimes.spawn import Child
from tether.agent.runtimes.threads import in_thread

__all__ = ["FdWatch", "PipeCopies", "exit_of"]

_HAS_PIDFD = hasattr(os, "pidfd_open")


class FdWatch:
    """Calls a callback whenever one of many fds is readable, from the running loop.

    The fds sit in one epoll set whose own fd is the only one the loop watches; without
    epoll each fd is a reader of the loop. Level-triggered: a callback that leaves data
    unread is called again. ``close`` stops watching everything.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        if self._ep is not None:
            self.loop.add_reader(self._ep.fileno(), self._ready)

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` while ``fd`` is readable, until :meth:`remove`."""
        if self._ep is None:
            self.loop.add_reader(fd, callback)
            return
        self._ep.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed). Idempotent."""
        if self._ep is None:
            self.loop.remove_reader(fd)
        elif self._callbacks.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except OSError:  # closed already: the kernel dropped it from the set
                pass

    def _ready(self) -> None:
        assert self._ep is not None
        for fd, _events in self._ep.poll(0, 256):
            callback = self._callbacks.get(fd)
            if callback is None:
                continue
            try:
                callback()
            except Exception as e:  # one fd's failure must not starve the others
                self.loop.call_exception_handler(
                    {"message": "fd watch callback failed", "exception": e}
                )

    def close(self) -> None:
        """Stop watching every fd. Idempotent."""
        if self._ep is not None and not self._ep.closed:
            self.loop.remove_reader(self._ep.fileno())
            self._ep.close()
        self._callbacks.clear()


def exit_of(proc: Child, watch: FdWatch) -> asyncio.Future:
    """A future of ``proc``'s return code (negative: the signal that killed it).

    The child is reaped here, by ``Child.poll``, so its ``returncode`` is set too.
    """
    loop = watch.loop
    fut: asyncio.Future = loop.create_future()
    try:
        pidfd = os.pidfd_open(proc.pid) if _HAS_PIDFD else -1
    except OSError:  # an old kernel (ENOSYS) or a sandbox that forbids it
        pidfd = -1
    if pidfd < 0:
        waiting = in_thread(proc.wait, name="tether-wait")
        waiting.add_done_callback(lambda w: fut.done() or fut.set_result(w.result()))
        return fut

    def exited() -> None:
        code = proc.poll()
        if code is None:  # woken early: not reaped yet
            return
        watch.remove(pidfd)
        os.close(pidfd)
        if not fut.done():
            fut.set_result(code)

    watch.add(pidfd, exited)
    return fut


class PipeCopies:
    """Copies the read ends of a child's pipes into capped log files, from loop callbacks.

    Each fd is read until every writer has closed it; then it and its log are closed.
    ``done`` resolves once all are.

    Args:
        pairs: (read end, log) pairs; this object owns both and closes them.
        watch: Watches the read ends.
        on_error: Called with the OSError of a failed log write (the copy goes on draining).
    """

    def __init__(
        self,
        pairs: list[tuple[int, CappedLog]],
        watch: FdWatch,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._watch = watch
        self._open = dict(pairs)
        self._logs = [log for _, log in pairs]
        self._on_error = on_error
        self.done: asyncio.Future = watch.loop.create_future()
        for fd in self._open:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)  # a read end has no other flags
            watch.add(fd, lambda fd=fd: self._readable(fd))
        if not self._open:
            self.done.set_result(None)

    def _readable(self, fd: int) -> None:
        log = self._open.get(fd)
        if log is None:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        try:
            log.write(data)
        except OSError as e:
            # Disk full or the file went away: keep draining so the task is not stalled.
            log.close()
            if self._on_error is not None:
                self._on_error(e)

    def pump(self) -> None:
        """Read what is already in the pipes now, without waiting for the loop to call back
        (a task that has exited usually left its output and its EOF there)."""
        for fd in list(self._open):
            for _ in range(16):  # bounded: a background child may write on and on
                if fd not in self._open:
                    break
                before = self._open[fd].written
                self._readable(fd)
                if fd in self._open and self._open[fd].written == before:
                    break

    def _close(self, fd: int) -> None:
        log = self._open.pop(fd)
        self._watch.remove(fd)
        os.close(fd)
        log.close()
        if not self._open and not self.done.done():
            self.done.set_result(None)

    @property
    def printed(self) -> bool:
        """Whether any output reached a log (else no log file was created)."""
        return any(log.created for log in self._logs)

    def close(self) -> None:
        """Stop copying: close every fd and log still open. Idempotent."""
        for fd in list(self._open):
            self._close(fd)
