"""The chaos suite's shared pieces: the report every scenario adds its numbers to, and a
small mesh of real processes (controllers and agents as subprocesses)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chaos_records import TTL, write_report
from helpers import ControllerProcess, agent_process, wait_for

from tether.sdk import Client

_REPORT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def chaos_report():
    """Scenario name → its measured numbers; written to build/chaos-report.json at the end."""
    yield _REPORT
    if _REPORT:
        path = write_report(_REPORT)
        print(f"\nchaos report: {path}")


class ProcessMesh:
    """Controllers and agents as real subprocesses, on the node lease TTL of the suite."""

    def __init__(self, etcd: str, prefix: str, tmp: Path, controllers: int = 1) -> None:
        self.tmp = tmp
        self.controllers = [
            ControllerProcess(etcd, prefix, tmp / f"c{i}.log", ("--lease-ttl", str(TTL)))
            for i in range(controllers)
        ]
        self.agents: dict[str, subprocess.Popen] = {}
        self.client: Client | None = None

    @property
    def addresses(self) -> str:
        """Every controller's address, comma-separated (what agents and clients take)."""
        return ",".join(c.address for c in self.controllers)

    def start(self) -> ProcessMesh:
        self.controllers[0].start()
        for c in self.controllers[1:]:
            c.start(leader=False)
        self.client = Client(self.addresses, timeout=10)
        return self

    def add_agent(self, name: str, *args: str, controller: str = "", wait: bool = True) -> None:
        """Start ``tether agent --name NAME`` (2 CPUs, 8 task slots, no drain on exit); wait
        until it is listed."""
        self.agents[name] = agent_process(
            controller or self.addresses,
            name,
            self.tmp / "agents" / name,
            *("--max-tasks", "8", "--drain-grace", "0s"),
            *args,
            log=self.tmp / f"agent-{name}.log",
        )
        if wait:
            wait_for(lambda: name in self.node_names(), 30, f"agent {name} registered")

    def node_names(self) -> set[str]:
        assert self.client is not None
        with contextlib.suppress(Exception):
            return {n.name for n in self.client.nodes()}
        return set()

    def kill_agent(self, name: str) -> None:
        proc = self.agents.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        if self.client:
            self.client.close()
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.agents.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for c in self.controllers:
            c.stop()


@pytest.fixture
def process_mesh(etcd, prefix, tmp_path):
    """Start a :class:`ProcessMesh` on the session etcd: ``process_mesh(controllers=2)``."""
    made: list[ProcessMesh] = []

    def make(controllers: int = 1, endpoints: str = "") -> ProcessMesh:
        m = ProcessMesh(endpoints or etcd.endpoint, prefix, tmp_path, controllers)
        made.append(m)
        return m.start()

    yield make
    for m in made:
        m.close()
