"""A real local mesh for tests: a controller and agents on a background event loop.

etcd is a real process (see conftest); the controller's gRPC server listens on port 0; agents
connect over real gRPC. Tests drive the mesh with the synchronous SDK from the test thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

from tether.agent.agent import Agent
from tether.agent.config import AgentConfig
from tether.controller.config import ControllerConfig
from tether.controller.server import ControllerServer
from tether.sdk.client import Client


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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

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
