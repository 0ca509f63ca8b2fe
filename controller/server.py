"""The controller process: etcd store, engine and gRPC server, with an orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.api.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from tether.controller.auth import auth_required
from tether.controller.cache import Snapshot
from tether.controller.config import ControllerConfig, advertised, is_loopback
from tether.controller.engine import Engine
from tether.controller.errors import NotLeader, store_unavailable
from tether.controller.etcd_connection import EtcdConnection
from tether.controller.grpc_metrics import GrpcMetrics
from tether.controller.guard import Guard
from tether.controller.leader import Leadership
from tether.controller.logs import LogRouter
from tether.controller.malformed import MalformedRequests
from tether.controller.metrics import Metrics
from tether.controller.secretbox import SecretBox
from tether.controller.secrets import Secrets
from tether.controller.service import AgentServicer, ControllerServicer
from tether.controller.store import Store
from tether.controller.tokens import TokenStore
from tether.sdk.telemetry import get_logger, make_tracer_provider

__all__ = ["ControllerServer"]

log = get_logger("controller.server")

# Delays between campaigns while etcd does not answer, seconds.
_RETRY_INITIAL = 0.2
_RETRY_MAX = 1.0

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
        self.store = Store(EtcdConnection.from_config(config), config.prefix)
        # Raises KeyFileError (a ValueError) now, before anything is started, for a bad file.
        box = SecretBox.from_file(config.secrets_key_file) if config.secrets_key_file else None
        self.secrets = Secrets(self.store, box)
        self._secrets_task: asyncio.Task | None = None
        self.tokens = TokenStore(self.store)
        self.auth = auth_required(config)
        # The engine of the current leadership term; None while standing by.
        self.engine: Engine | None = None
        self.leadership: Leadership | None = None
        self.terms = 0
        # One router for every term: each log stream is bound to an agent session, and sessions
        # end with their term.
        self.logs = LogRouter()
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        self.store.observe = self.metrics.observe_etcd
        self.metrics.etcd_largest_request.set_function(lambda: self.store.max_request_bytes)
        self.metrics_port = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._campaign: asyncio.Task | None = None
        self._leading = asyncio.Event()
        self._standing_by = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._servicer: ControllerServicer | None = None
        # Why the last campaign failed (etcd unreachable, no quorum); "" while etcd answers.
        self.store_error = ""

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def advertise(self) -> str:
        """Where others reach this controller (``--advertise``, else derived from --listen)."""
        return self.config.advertise or advertised(self.config.listen, self.port)

    def current_engine(self) -> Engine:
        """The engine of this term, or the error that says why there is none and where to go."""
        engine = self.engine
        if engine is not None:
            return engine
        if self.store_error:
            raise store_unavailable(
                RuntimeError(self.store_error), self.store.connection.describe()
            )
        holder = self.leadership.holder if self.leadership else ""
        if holder and holder != self.advertise:
            raise NotLeader(f"this controller is standing by; the leader is {holder}", holder)
        raise NotLeader("this controller is standing by (no leader elected yet); retry shortly")

    @property
    def is_leader(self) -> bool:
        return self.engine is not None

    async def start(self, wait_for_leadership: bool = True) -> None:
        """Connect to etcd, start serving, and campaign for leadership.

        Args:
            wait_for_leadership: Return only once this controller leads (True), or as soon as
                it either leads or stands by behind another leader (False).
        """
        _check_free(self.config.listen)
        if self.config.metrics_listen:
            # Bound first: a taken port then fails before anything else has started.
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        await self.store.connect()
        await self.store.wait_ready(self.config.etcd_wait)
        # Loaded before any term starts: assignments a new leader re-sends need them.
        await self.secrets.load()
        self._secrets_task = asyncio.create_task(self.secrets.follow(), name="secrets")
        opts = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        guard = Guard(
            self.tokens,
            self.auth,
            self.config.rate_limit,
            self.config.rate_burst,
            agents_need_token=not self.config.tls_ca,
        )
        # Metrics first: the outermost, so it counts what the others refuse.
        interceptors = [GrpcMetrics(self.metrics), MalformedRequests(), guard]
        server = grpc.aio.server(options=opts, interceptors=interceptors)
        current = self.current_engine  # the servicers' view of the current term
        self._servicer = ControllerServicer(
            current, self.tracer, self.logs, self.tokens, self.secrets
        )
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(self._servicer, server)
        node_ca = _read(self.config.tls_ca, "tls_ca") if self.config.tls_ca else b""
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(current, self.logs, node_ca), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self.config.tls:
            creds = grpc.ssl_server_credentials(
                [(_read(self.config.tls_key, "tls_key"), _read(self.config.tls_cert, "tls_cert"))]
            )
            self.port = server.add_secure_port(self.config.listen, creds)
        else:
            if not is_loopback(self.config.listen):
                log.warning(
                    "SERVING PLAINTEXT ON A NETWORK ADDRESS (--insecure): anyone who reaches "
                    "this port can run commands on every node",
                    listen=self.config.listen,
                )
            self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        for name in _SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server
        self.metrics.follow(asyncio.get_running_loop(), self._snapshot)
        self._campaign = asyncio.create_task(self._campaign_loop(), name="campaign")
        waiters = [asyncio.ensure_future(self._leading.wait()), self._campaign]
        if not wait_for_leadership:
            waiters.append(asyncio.ensure_future(self._standing_by.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters[::2]:
            w.cancel()
        if self._campaign.done():
            self._campaign.result()  # raise what stopped the campaign
        log.info(
            "controller serving",
            address=self.address,
            advertise=self.advertise,
            prefix=self.config.prefix,
            leader=self.is_leader,
            tls=self.config.tls,
            node_certificates=bool(self.config.tls_ca),
            auth=self.auth,
        )

    def _snapshot(self) -> Snapshot:
        engine = self.engine
        return engine.snapshot() if engine else Snapshot(leader=False)

    async def _campaign_loop(self) -> None:
        """Lead when possible; on losing the lease, step down and campaign again — forever:
        an etcd that is down or without quorum only delays the next term."""
        delay = _RETRY_INITIAL
        while not self._stopping:
            try:
                await self._term()
                delay = _RETRY_INITIAL
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd away: stand by until it answers
                if not self.store_error:
                    log.warning("cannot campaign; retrying until etcd answers", error=str(e))
                self.store_error = str(e) or type(e).__name__
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)

    async def _term(self) -> None:
        """One leadership term: campaign, lead until the lease is lost, step down."""
        leadership = self.leadership = Leadership(
            self.store, self.advertise, self.config.leader_ttl, standing_by=self._standing_by
        )
        await leadership.acquire()
        if self.store_error:
            log.info("etcd answers again", address=self.advertise)
        self.store_error = ""
        self.store.fence = leadership.fence()
        engine = Engine(
            self.config,
            self.store,
            self.tracer,
            on_not_leader=leadership.lost.set,
            metrics=self.metrics,
            secrets=self.secrets,
        )
        try:
            await engine.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await engine.stop()
            leadership.abandon()  # the key names us: the next term takes it back at once
            raise
        self.engine = engine
        self.terms += 1
        for name in _SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._leading.set()
        await leadership.lost.wait()  # a cancel here is stop(), which shuts the engine down
        # Step down: stop acting before anyone else can; agents reconnect to the new leader.
        self.engine = None
        self._leading.clear()
        for name in _SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # The fence stays: it names our old term, so anything the stopped engine still
        # tries to write is refused until a new term sets a new fence.
        if leadership.etcd_error:
            self.store_error = leadership.etcd_error
        await engine.stop()
        leadership.abandon()
        log.warning("stepped down", address=self.advertise, error=leadership.etcd_error)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving: NOT_SERVING, drain RPCs, flush writes, resign, close etcd. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self.health.enter_graceful_shutdown()
            if self._servicer is not None:
                self._servicer.close_streams()
            engine = self.engine
            if engine is not None:
                try:
                    await asyncio.wait_for(engine.flushed(), grace)
                except TimeoutError:
                    log.warning("unflushed writes at shutdown; the next leader resumes from etcd")
            if self._secrets_task is not None:
                self._secrets_task.cancel()
            self.metrics.close()
            if self._campaign is not None:
                self._campaign.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._campaign
            if engine is not None:
                self.engine = None
                await engine.stop()
            if self.leadership is not None:
                await self.leadership.resign()  # a standby takes over now, not after the TTL
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


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{what}: cannot read {path}: {e.strerror}") from None


def _check_free(listen: str) -> None:
    """Fail with a plain OSError if ``listen`` is taken (gRPC would log a C-level error first)."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    for family, kind, proto, _, addr in socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM
    ):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(f"{listen} is not available: {e.strerror}") from None
        return
