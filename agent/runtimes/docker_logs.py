"""Copies a container's stdout and stderr into the attempt's log files, with a size cap.

Each stream is read from the engine's log (``GET /containers/{id}/logs``) from its first byte,
so a follower started after the container, or by an agent that restarted while the container
ran, still writes the whole output. While the container runs the file is followed and flushed
as data arrives, for readers that tail it; once it has exited the file is copied once more and
atomically replaced (unless the cap was reached), because a follower can miss the last writes of
an exiting container (seen with Docker 20.10's json-file driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import docker

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
        max_bytes: Most bytes written; the rest is dropped with a note at the end.
        follow: Keep reading until the container exits (False: copy what is there).
    """

    def __init__(
        self,
        api: docker.APIClient,
        container_id: str,
        stream: str,
        path: Path,
        max_bytes: int,
        follow: bool = True,
    ) -> None:
        self.api = api
        self.container_id = container_id
        self.stream = stream
        self.path = path
        self.max_bytes = max_bytes
        self.follow = follow
        self.written = 0
        self.truncated = False
        self._source = None
        self._closed = False
        self._done: asyncio.Future | None = None

    def start(self) -> None:
        """Start copying (from the event loop)."""
        self._done = in_thread(
            self._copy, self.path, self.follow, name=f"logs {self.container_id[:12]} {self.stream}"
        )

    def _copy(self, path: Path, follow: bool) -> None:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(path, "wb") as f:
            try:
                for chunk in source:
                    room = self.max_bytes - written
                    f.write(chunk[:room])
                    written += min(len(chunk), room)
                    if len(chunk) > room:
                        self.truncated = True
                        f.write(f"\n[tether: log cut at {self.max_bytes} bytes]\n".encode())
                        break
                    f.flush()
            except Exception as e:  # the engine went away mid-stream: keep what we have
                if not self._closed:
                    log.warning("container log broke", container=self.container_id, error=str(e))
            finally:
                self.written = written
                with contextlib.suppress(Exception):
                    source.close()

    def _final_copy(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        self._copy(tmp, follow=False)
        if tmp.exists():
            os.replace(tmp, self.path)

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
        """The container has exited: stop following and write the file from the engine's
        complete copy."""
        self.close()
        await self.join(1.0)
        # A follower that reached the cap already has all that is kept.
        if self.follow and not self.truncated:
            await asyncio.to_thread(self._final_copy)


def follow_logs(
    api: docker.APIClient,
    container_id: str,
    stdout_path: Path,
    stderr_path: Path,
    max_bytes: int,
    follow: bool = True,
) -> list[LogFollower]:
    """Start a follower for stdout and one for stderr."""
    out = [
        LogFollower(api, container_id, "stdout", stdout_path, max_bytes, follow),
        LogFollower(api, container_id, "stderr", stderr_path, max_bytes, follow),
    ]
    for f in out:
        f.start()
    return out
