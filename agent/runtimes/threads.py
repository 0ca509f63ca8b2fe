"""Blocking calls that may last as long as a task, run off the event loop.

``asyncio.to_thread`` suits short engine calls. A call that lasts as long as a container
(waiting for its exit, following its log) must not occupy the loop's default executor, which
has a few threads only and which ``asyncio.run`` waits for at exit: each gets a daemon thread
of its own instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["in_thread"]


def in_thread(fn: Callable[..., Any], *args: Any, name: str = "tether-blocking") -> asyncio.Future:
    """Run ``fn(*args)`` in a new daemon thread; the future resolves with its result.

    Cancelling the future does not stop the call: the caller must make it return (close its
    stream, say). A result that arrives after the loop has closed is dropped.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            result = (True, fn(*args))
        except BaseException as e:
            result = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut
