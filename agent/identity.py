"""Who this agent is: the node id kept in its work dir, the lock on that dir, its TLS files.

The node id tells the controller that a registering agent is the same one coming back (after a
broken stream or a restart) rather than a second agent claiming a node that is taken. The lock
makes one work dir belong to one agent process: two agents sharing one would share a node id,
and each would adopt and kill the other's attempts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["NODE_ID_FILE", "TlsFiles", "WorkDirBusy", "WorkDirLock", "load_node_id"]

NODE_ID_FILE = "node-id"
_LOCK_FILE = "agent.lock"


class WorkDirBusy(RuntimeError):
    """Another agent process holds the work dir."""


def load_node_id(work_dir: Path) -> str:
    """This work dir's node id, created (random) on first use and kept from then on."""
    path = Path(work_dir) / NODE_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        value = path.read_text().strip()
        if value:
            return value
    value = uuid.uuid4().hex
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Readable by the agent's user alone: where no node certificates are checked, the id is
    # what tells this node's agent from another claiming its name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return value


class WorkDirLock:
    """An exclusive ``flock`` on ``<work_dir>/agent.lock`` for as long as the agent runs."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / _LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            WorkDirBusy: Another agent runs with this work dir (its pid is in the message).
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkDirBusy(
                f"another agent (pid {holder}) runs with work dir {self.path.parent}; "
                "stop it, or give this agent its own --work-dir and --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@dataclass(frozen=True)
class TlsFiles:
    """The agent's TLS files; read again at every connection, so replacing them rotates."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def read_cert(self) -> bytes:
        return Path(self.cert).read_bytes() if self.cert else b""

    def read_key(self) -> bytes:
        return Path(self.key).read_bytes() if self.key else b""

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials trusting ``ca`` (the system's roots without it)."""
        root = Path(self.ca).read_bytes() if self.ca else None
        return grpc.ssl_channel_credentials(root_certificates=root)
