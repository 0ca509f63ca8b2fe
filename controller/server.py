"""The controller process: etcd store, engine and gRPC server, with an orderly shutdown."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.api.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from tether.controller.config import ControllerConfig
from tether.controller.engine import Engine
from tether.controller.service import AgentServicer, ControllerServicer
from tether.controller.store import Store
from tether.sdk.telemetry import get_logger, make_tracer_provider

__all__ = ["ControllerServer"]

log = get_logger("controller.server")

_SERVICES = (
    controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


class ControllerServer:
    """A running controller. Use ``async with ControllerServer(cfg) as s:`` or start/stop.

    Args:
        config: The controller's configuration.
    """

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.tracer_provider = make_tracer_provider(config.service_name)
        self.tracer = self.tracer_provider.get_tracer("tether.controller")
        self.store = Store(config.etcd_endpoints, config.prefix)
        self.engine = Engine(config, self.store, self.tracer)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Connect to etcd, load state, and start serving."""
        await self.store.connect()
        await self.store.wait_ready()
        await self.engine.start()
        opts = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=opts)
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            ControllerServicer(self.engine, self.tracer), server
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(self.engine), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server = server
        for name in ("", *_SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("controller serving", address=self.address, prefix=self.config.prefix)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving: NOT_SERVING, drain RPCs, flush writes, close etcd. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self.health.enter_graceful_shutdown()
            try:
                await asyncio.wait_for(self.engine.committer.flushed(), grace)
            except TimeoutError:
                log.warning("unflushed writes at shutdown; the next controller resumes from etcd")
            await self.engine.stop()
            if self._server is not None:
                await self._server.stop(grace)
            await self.store.close()
            self.tracer_provider.shutdown()
        finally:
            self._stopped.set()
            log.info("controller stopped")

    async def wait(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> ControllerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
