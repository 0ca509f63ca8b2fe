"""Copies a container's stdout and stderr into the attempt's log files, with a size cap.

Each stream is read from the engine's log (``GET /containers/{id}/logs``) from its first byte,
so a follower started after the container, or by an agent that restarted while the container
ran, still writes the whole output. While the container runs the file is followed and written
as data arrives, for readers that tail it (``tether logs -f``). Once it has exited, the engine's
log is read once more and whatever the follower had not written is appended, because a
follower can miss the last writes of an exiting container (seen with Docker 20.10's json-file
driver).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import docker

from tether.agent.layout import open_task_file
from tether.agent.runtimes.capped_log import truncation_note
from tether.agent.runtimes.threads import in_thread
from tether.sdk.telemetry import get_logger

__all__ = ["LogFollower", "follow_logs"]

log = get_logger("agent.docker.logs")


class LogFollower:
    """Writes one stream of a container's log to a file, in a thread of its own.

    Args:
        api: The engine client.
        container_id: The container.
        stream: ``"stdout"`` or ``"stderr"``.
        path: The file to (re)write.
        limit: Most bytes written; the rest is dropped, with a note at the end. 0: no cap.
        follow: Keep reading until the container exits (False: copy what is there).
        on_truncate: Called once (from the copying thread) when output first passes the cap.
    """

    def __init__(
        self,
        api: docker.APIClient,
        container_id: str,
        stream: str,
        path: Path,
        limit: int,
        follow: bool = True,
        on_truncate: Callable[[], None] | None = None,
    ) -> None:
        self.api = api
        self.container_id = container_id
        self.stream = stream
        self.path = path
        self.limit = limit
        self.follow = follow
        self.written = 0
        self.truncated = False
        self._on_truncate = on_truncate
        self._source = None
        self._closed = False
        self._done: asyncio.Future | None = None

    def start(self) -> None:
        """Start copying (from the event loop): the file is emptied and written anew."""
        self._done = in_thread(
            self._copy, self.follow, 0, name=f"logs {self.container_id[:12]} {self.stream}"
        )

    def _copy(self, follow: bool, skip: int) -> None:
        """Copy the engine's log into the file; the first ``skip`` bytes are there already."""
        try:
            source = self.api.logs(
                self.container_id,
                stdout=self.stream == "stdout",
                stderr=self.stream == "stderr",
                stream=True,
                follow=follow,
            )
        except docker.errors.DockerException as e:
            log.warning("cannot read container log", container=self.container_id, error=str(e))
            return
        if follow:
            self._source = source
            if self._closed:
                source.close()
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The container may have put a link to a host file in the log's place.
            f = open_task_file(self.path, "a" if skip else "w")
        except OSError as e:
            log.warning("cannot write container log", path=str(self.path), error=str(e))
            with contextlib.suppress(Exception):
                source.close()
            return
        with f:
            try:
                for chunk in source:
                    if skip:
                        chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                    if chunk and not self._write(f, chunk):
                        break
            except Exception as e:  # the engine went away mid-stream: keep what we have
                if not self._closed:
                    log.warning("container log broke", container=self.container_id, error=str(e))
            finally:
                with contextlib.suppress(Exception):
                    source.close()

    def _write(self, f, chunk: bytes) -> bool:
        """Append ``chunk`` under the cap; False once the cap is reached."""
        if self.limit > 0 and self.written + len(chunk) > self.limit:
            keep = self.limit - self.written
            f.write(chunk[:keep] + truncation_note(self.limit))
            self.written += keep
            self.truncated = True
            if self._on_truncate is not None:
                self._on_truncate()
            return False
        f.write(chunk)
        self.written += len(chunk)
        return True

    def close(self) -> None:
        """Stop following: the thread ends after the chunk it is writing."""
        self._closed = True
        if self._source is not None:
            with contextlib.suppress(Exception):
                self._source.close()

    async def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the copy to end; True if it did."""
        if self._done is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:
            return False
        except Exception:
            pass
        return True

    async def finish(self) -> None:
        """The container has exited: stop following, then append what the follower missed
        from the engine's complete copy."""
        self.close()
        if not await self.join(1.0):
            return  # still writing: appending now would interleave
        if self.follow and not self.truncated:
            await asyncio.to_thread(self._copy, False, self.written)


def follow_logs(
    api: docker.APIClient,
    container_id: str,
    stdout_path: Path,
    stderr_path: Path,
    limit: int,
    follow: bool = True,
    on_truncate: Callable[[str], None] | None = None,
) -> list[LogFollower]:
    """Start a follower for stdout and one for stderr.

    ``on_truncate(stream)`` is called from a copying thread when a stream reaches the cap.
    """
    out = [
        LogFollower(
            api,
            container_id,
            stream,
            path,
            limit,
            follow,
            (lambda s=stream: on_truncate(s)) if on_truncate else None,
        )
        for stream, path in (("stdout", stdout_path), ("stderr", stderr_path))
    ]
    for f in out:
        f.start()
    return out
