"""An attempt's log file that stops growing at a size cap.

Runtimes write each attempt's stdout and stderr to ``stdout.log``/``stderr.log`` in its
attempt directory, where ``tether logs`` reads them. A task that prints without end must not
fill the node's disk, so the files stop at ``LaunchSpec.log_limit_bytes``; what comes after is
read and discarded (a writer that stopped reading would block the task on a full pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tether.agent.layout import open_task_file

__all__ = ["CappedLog", "copy_to_log", "truncation_note"]

READ_SIZE = 64 * 1024


def truncation_note(limit: int) -> bytes:
    """The line written once at the end of a log that reached its cap of ``limit`` bytes."""
    return f"\n[tether: log truncated at {limit} bytes; later output was discarded]\n".encode()


class CappedLog:
    """A log file that keeps the first ``limit`` bytes written to it, then a truncation note.

    The file is created (emptied) by the first write, so that an attempt that prints nothing
    costs no file (readers take a missing log for an empty one), and written unbuffered, so
    readers that tail it (``tether logs -f``) see output as soon as it arrives.

    Args:
        path: The file to write.
        limit: Most bytes of output kept; 0 or less keeps everything.
        on_truncate: Called once, when output first goes past the cap.

    ``write`` raises OSError when the file cannot be created or written.
    """

    def __init__(
        self,
        path: str | Path,
        limit: int,
        on_truncate: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.limit = limit
        self.written = 0
        self.truncated = False
        self._on_truncate = on_truncate
        self._file: BinaryIO | None = None
        self._closed = False

    def write(self, data: bytes) -> None:
        """Append ``data``, or the part of it under the cap; past the cap, drop it."""
        if self.truncated or self._closed or not data:
            return
        if self._file is None:
            self._file = open_task_file(self.path, "w")
        if self.limit > 0 and self.written + len(data) > self.limit:
            keep = self.limit - self.written
            self._file.write(data[:keep] + truncation_note(self.limit))
            self.written += keep
            self.truncated = True
            if self._on_truncate is not None:
                self._on_truncate()
            return
        self._file.write(data)
        self.written += len(data)

    @property
    def created(self) -> bool:
        """Whether the file was created (by a write), however it ended."""
        return self._file is not None

    def close(self) -> None:
        """Close the file; later writes are dropped. Idempotent."""
        self._closed = True
        if self._file is not None:
            self._file.close()


async def copy_to_log(reader: asyncio.StreamReader, log: CappedLog) -> None:
    """Copy ``reader`` into ``log`` until end of file, then close the log.

    Reading goes on past the cap so that the writing process never blocks on a full pipe.
    """
    try:
        while data := await reader.read(READ_SIZE):
            try:
                log.write(data)
            except OSError:
                # Disk full or the file went away: keep draining so the task is not stalled.
                with contextlib.suppress(OSError):
                    log.close()
    finally:
        log.close()
