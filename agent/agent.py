"""The agent process: registers this node, keeps the stream to the controller, runs tasks."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
from google.protobuf import duration_pb2

from tether.agent.config import AgentConfig
from tether.agent.identity import TlsFiles, WorkDirLock, load_node_id
from tether.agent.logs import LogStreams
from tether.agent.metrics import AgentMetrics
from tether.agent.reconnect import Reconnect
from tether.agent.resources import (
    detect_cpu,
    detect_gpus,
    detect_memory,
    free_port,
    gpu_labels,
)
from tether.agent.retention import WorkDirCleaner
from tether.agent.runner import Runner
from tether.agent.runtimes import registry
from tether.agent.runtimes.base import Runtime
from tether.agent.supervision import Key, key_of
from tether.api.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tether.sdk.certs import sign_challenge
from tether.sdk.states import DRAINED
from tether.sdk.telemetry import get_logger, make_tracer_provider

__all__ = ["Agent", "AgentRefused", "make_runtime"]

log = get_logger("agent")
VERSION = "0.1.0"
# Most messages sent as one AgentBatch; one is closed once it holds this many bytes (log
# chunks are up to 64 KiB each).
MAX_BATCH = 256
MAX_BATCH_BYTES = 4 * 2**20
# Answers to a first registration that mean "not you": retrying would only repeat them.
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
}
# A RUNNING report waits up to this long (seconds) before it is sent, so that the final report
# of an attempt that ends at once replaces it: the controller takes SCHEDULED -> SUCCEEDED,
# with the start time from the final report. For the many short attempts of a busy node that
# is one stream message and one etcd write fewer each; a longer one shows as RUNNING this late.
RUNNING_HOLD = 0.05
_RUNNING = types_pb2.TaskState.TASK_STATE_RUNNING


def _duration(seconds: float) -> duration_pb2.Duration | None:
    if not seconds:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class AgentRefused(RuntimeError):
    """The controller refused this node before it ever registered (identity, name clash)."""


def make_runtime(config: AgentConfig) -> Runtime:
    """Build the runtime the configuration names (see :mod:`tether.agent.runtimes.registry`)."""
    # Built here rather than in the registry: the config already imports the registry to check
    # names, and the registry importing the config back would make a cycle.
    info = registry.get(config.runtime)
    cls = info.load()
    return cls(config) if info.takes_config else cls()


class Agent:
    """One node's agent. ``await agent.run()`` until ``await agent.stop()``.

    Args:
        config: The agent's configuration.
        runtime: Overrides the runtime built from the configuration (tests).
    """

    def __init__(self, config: AgentConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.tracer_provider = make_tracer_provider(config.service_name)
        self.runtime = runtime or make_runtime(config)
        self.metrics = AgentMetrics(config.node, self.runtime.name)
        self.metrics_port = 0
        self.runner = Runner(
            config,
            self.runtime,
            self.tracer_provider.get_tracer("tether.agent"),
            self._report,
            self._send_event,
            self.metrics,
        )
        self.logs = LogStreams(
            config.work_dir,
            self.runner.is_running,
            config.node,
            retention=config.work_retention,
        )
        cpu = config.cpu or detect_cpu()
        self.capacity = types_pb2.Resources(
            cpu=cpu,
            memory_bytes=config.memory_bytes or detect_memory(),
        )
        self.gpus = detect_gpus(config.fake_gpus)
        self.capacity.gpu = len(self.gpus)
        self.max_tasks = config.max_tasks or max(2, int(cpu * 2))
        self.connected = asyncio.Event()
        self.registrations = 0
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] | None = None
        # The controller of the current stream reads AgentBatch messages.
        self._peer_batches = False
        self._stop = asyncio.Event()
        self._main: asyncio.Task | None = None
        # Several comma-separated controllers (HA): a broken or refused stream moves on to the
        # next one, so the agent finds whichever controller leads.
        self.reconnect = Reconnect(
            [a.strip() for a in config.controller.split(",") if a.strip()],
            config.reconnect_initial,
            config.reconnect_max,
        )
        self._recovered = False
        self.cleaner: WorkDirCleaner | None = None  # with work_retention
        self._cleaner_task: asyncio.Task | None = None
        self.tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_ca)
        # When a controller last renewed this node's lease (time.monotonic(); 0: never), and
        # the lease's TTL as the controller gave it.
        self.last_contact = 0.0
        self.lease_ttl = 0.0
        self.fenced = 0  # attempts this agent stopped for want of contact
        self.node_id = ""
        self._lock = WorkDirLock(config.work_dir)
        self.draining = False  # set by drain(): the node takes no new work
        self._beat_seq = 0
        # When each unanswered heartbeat was sent (time.monotonic()), by seq.
        self._beats_sent: dict[int, float] = {}
        # RUNNING reports held back (see RUNNING_HOLD), oldest first, with when each was held
        # (time.monotonic()); and the one timer sending the oldest when its hold is over.
        self._held: dict[Key, tuple[agent_pb2.TaskStatus, float]] = {}
        self._held_timer: asyncio.TimerHandle | None = None

    def _report(self, status: agent_pb2.TaskStatus) -> None:
        key = key_of(status.ref)
        if status.state == _RUNNING:
            self._held.pop(key, None)  # held again: it waits anew, behind the others
            self._held[key] = (status, time.monotonic())
            if self._held_timer is None:
                loop = asyncio.get_running_loop()
                self._held_timer = loop.call_later(RUNNING_HOLD, self._send_held)
            return
        self._held.pop(key, None)  # superseded: the final report says when it started
        if self._outbox is not None:
            self._outbox.put_nowait(agent_pb2.AgentMessage(status=status))

    def _send_held(self) -> None:
        """Send the RUNNING reports held for RUNNING_HOLD; wait for the next one's turn.

        Each is held its full time, not until the timer a report before it started fires:
        at a busy node's rate, that sent a fifth of all attempts' RUNNING reports after a
        millisecond or two, most just before the final report that would have replaced them.
        """
        self._held_timer = None
        due = time.monotonic() - RUNNING_HOLD
        send = []
        for key, (_status, held_at) in self._held.items():
            if held_at > due:
                break
            send.append(key)
        # Without a stream they are dropped: the next Register lists the attempts as running.
        for key in send:
            status, _ = self._held.pop(key)
            if self._outbox is not None:
                self._outbox.put_nowait(agent_pb2.AgentMessage(status=status))
        if self._held:
            oldest = next(iter(self._held.values()))[1]
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(max(0.0, oldest - due), self._send_held)

    def _send_event(self, event: agent_pb2.TaskEventReport) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(agent_pb2.AgentMessage(event=event))

    async def run(self) -> None:
        """Recover this node's work, then connect, and reconnect with backoff and jitter,
        until stopped."""
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self.node_id = load_node_id(self.config.work_dir)
        if self.config.metrics_listen and not self.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
            log.info("serving metrics", node=self.config.node, port=self.metrics_port)
        if not self._recovered:
            self._recovered = True
            try:
                found = await self.runner.recover()
                if found:
                    log.info("recovered attempts", node=self.config.node, count=found)
                self._start_cleaner()
            except Exception as e:
                # An engine that is down now may be up by the first assignment. The work dir
                # is not cleaned then: the attempts left running are not known.
                log.warning("cannot recover attempts", node=self.config.node, error=str(e))
        fence = asyncio.create_task(self._fence_loop(), name="fence")
        try:
            await self._connect_loop()
        finally:
            fence.cancel()
            self._stop_cleaner()

    def _start_cleaner(self) -> None:
        """Start removing old run directories (work_retention), once recovery has told which
        attempts are still this node's."""
        if self.config.work_retention <= 0 or self._cleaner_task is not None:
            return
        self.cleaner = WorkDirCleaner(
            self.config.work_dir,
            self.config.work_retention,
            self.runner.runs_in_use,
            # Only an agent that is not root needs the runtime's help to delete.
            getattr(self.runtime, "remove_tree", None)
            if getattr(self.runtime, "owner_uid", 0) != 0
            else None,
        )
        self._cleaner_task = asyncio.create_task(self.cleaner.run(), name="work dir cleaner")

    def _stop_cleaner(self) -> None:
        if self._cleaner_task is not None:
            self._cleaner_task.cancel()
            self._cleaner_task = None

    @property
    def disconnect_grace(self) -> float:
        """Seconds of lost contact after which this agent stops its attempts (0: not known
        before the first registration)."""
        return self.config.disconnect_grace or self.lease_ttl

    async def _fence_loop(self) -> None:
        """Stop every attempt once the node has been out of contact for its grace.

        The controller declares the node lost when its lease expires and starts the attempts
        elsewhere no earlier than the grace after the last contact, so the attempts here must
        be dead by then: the stop begins early enough for SIGTERM, its grace and SIGKILL.
        """
        while True:
            await asyncio.sleep(0.05)
            grace = self.disconnect_grace
            if not grace or not self.last_contact or not self.runner.attempts:
                continue
            kill_grace = min(self.config.stop_grace, grace / 4)
            away = time.monotonic() - self.last_contact
            if away < grace - kill_grace - min(0.25, grace / 10):
                continue
            fenced = self.runner.fence(
                f"node {self.config.node} had no contact with a controller for {away:.1f}s "
                f"(disconnect grace {grace:g}s); stopped so that it can run elsewhere",
                kill_grace,
            )
            if fenced:
                self.fenced += fenced
                log.warning(
                    "out of contact: stopping attempts", node=self.config.node, count=fenced
                )

    async def _connect_loop(self) -> None:
        while not self._stop.is_set():
            registrations = self.registrations
            address = self.reconnect.address
            error: grpc.aio.AioRpcError | None = None
            try:
                await self._session(address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                error = e
                if e.code() in _REFUSALS and self.registrations == 0:
                    # Refused before ever registering: retrying cannot help, say so and exit.
                    raise AgentRefused(
                        f"controller {address} refused node {self.config.node} "
                        f"({e.code().name}): {e.details()}"
                    ) from None
                log.info(
                    "controller stream ended",
                    node=self.config.node,
                    code=e.code().name,
                    details=e.details(),
                )
            except Exception as e:  # keep the node alive and retry
                log.warning("agent session failed", node=self.config.node, error=repr(e))
            finally:
                self._outbox = None
                self.connected.clear()
            if self._stop.is_set():
                break
            sleep = self.reconnect.after(self.registrations > registrations, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), sleep)

    async def _session(self, address: str) -> None:
        # Read at every connection: replacing the files (and reconnecting) rotates them.
        cert, key = self.tls.read_cert(), self.tls.read_key()
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        outbox.put_nowait(agent_pb2.AgentMessage(register=self._register(cert)))

        linger = self.config.report_linger

        async def requests():
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                if self._peer_batches and linger and msg.HasField("status"):
                    # Reports of attempts that end just after this one join its batch (even
                    # with others queued already: the batch is what saves both ends CPU).
                    await asyncio.sleep(linger)
                if not self._peer_batches or outbox.empty():
                    yield msg
                    continue
                # Whatever queued up meanwhile (reports of attempts that ended together) goes
                # as one message: the per-message cost on both ends is most of a report's.
                batch = [msg]
                size = msg.ByteSize()
                closing = False
                while not outbox.empty() and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    nxt = outbox.get_nowait()
                    if nxt is None:
                        closing = True
                        break
                    batch.append(nxt)
                    size += nxt.ByteSize()
                yield agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=batch))
                if closing:
                    return

        options = [
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.keepalive_time_ms", 10_000),
        ]
        if self.tls.enabled:
            channel = grpc.aio.secure_channel(address, self.tls.credentials(), options)
        else:
            channel = grpc.aio.insecure_channel(address, options)
        async with channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            token = self.config.token
            call = stub.Connect(
                requests(), metadata=(("authorization", f"Bearer {token}"),) if token else None
            )
            stop_waiter = asyncio.ensure_future(self._stop.wait())
            heartbeat: asyncio.Task | None = None
            # Ends the session when the agent stops, or when heartbeats go unanswered (a
            # stream that looks open but leads nowhere): reconnecting may find a controller.
            waiting: set[asyncio.Future] = {stop_waiter}
            try:
                it = call.__aiter__()
                while True:
                    nxt = asyncio.ensure_future(it.__anext__())
                    done, _ = await asyncio.wait(
                        {nxt, *waiting}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if nxt not in done:
                        nxt.cancel()
                        if heartbeat in done:
                            log.warning(
                                "heartbeats unanswered; reconnecting", node=self.config.node
                            )
                        return
                    try:
                        msg = nxt.result()
                    except StopAsyncIteration:
                        return
                    kind = msg.WhichOneof("msg")
                    for one in msg.batch.messages if kind == "batch" else (msg,):
                        kind = one.WhichOneof("msg")
                        if kind == "heartbeat_ack":
                            self.last_contact = time.monotonic()
                            sent = self._beats_sent.pop(one.heartbeat_ack.seq, None)
                            if sent is not None:
                                self.metrics.heartbeat_acked(self.last_contact - sent)
                        elif kind == "registered":
                            heartbeat = self._registered(one.registered, outbox, address)
                            waiting.add(heartbeat)
                        elif kind == "challenge":
                            outbox.put_nowait(self._proof(key, one.challenge.challenge))
                        else:
                            self._dispatch(one, outbox)
            finally:
                # Log streams answer this connection's requests; a new one gets new requests.
                self.logs.cancel_all()
                stop_waiter.cancel()
                if heartbeat:
                    heartbeat.cancel()
                outbox.put_nowait(None)
                call.cancel()

    def _proof(self, key: bytes, challenge: bytes) -> agent_pb2.AgentMessage:
        """Answer the controller's node challenge with the node key's signature."""
        signature = sign_challenge(key, challenge, self.config.node) if key else b""
        return agent_pb2.AgentMessage(proof=agent_pb2.NodeProof(signature=signature))

    def _register(self, certificate: bytes = b"") -> agent_pb2.Register:
        """The first message of a stream: this node, its capacity, and its work so far."""
        return agent_pb2.Register(
            node=self.config.node,
            node_id=self.node_id,
            certificate=certificate,
            disconnect_grace=_duration(self.config.disconnect_grace),
            capacity=self.capacity,
            gpus=self.gpus,
            # The user's --labels win over the detected ones of the same key.
            labels={**gpu_labels(self.gpus), **self.config.labels},
            address=self.config.address,
            free_port=free_port(),
            agent_version=VERSION,
            runtime=self.runtime.name,
            running=self.runner.running_refs(),
            pending_reports=self.runner.pending_reports(),
            max_tasks=self.max_tasks,
            draining=self.draining,
            batches=True,
        )

    def _registered(
        self, registered: agent_pb2.Registered, outbox: asyncio.Queue, address: str
    ) -> asyncio.Task:
        """The controller accepted this node: report through this stream, start beating."""
        interval = registered.heartbeat_interval.ToNanoseconds() / 1e9
        self.lease_ttl = registered.lease_ttl.ToNanoseconds() / 1e9
        self.last_contact = time.monotonic()
        self._outbox = outbox
        self._peer_batches = registered.batches
        self._beat_seq = 0
        self._beats_sent.clear()
        self.registrations += 1
        self.connected.set()
        log.info("registered", node=self.config.node, controller=address)
        return asyncio.create_task(self._heartbeat(outbox, interval or 1.0))

    def _dispatch(self, msg: agent_pb2.ControllerMessage, outbox: asyncio.Queue) -> None:
        """Hand a controller's request to the part of the agent that serves it."""
        kind = msg.WhichOneof("msg")
        if kind == "assign":
            self.runner.assign(msg.assign)
        elif kind == "cancel":
            self.runner.cancel(msg.cancel)
        elif kind == "ack":
            self.runner.ack(msg.ack.ref)
        elif kind == "logs":
            self.logs.start(msg.logs, outbox)
        elif kind == "logs_cancel":
            self.logs.cancel(msg.logs_cancel.stream_id)

    async def _heartbeat(self, outbox: asyncio.Queue, interval: float) -> None:
        """Beat every ``interval``; return when answers stop (the session is then ended)."""
        while True:
            if time.monotonic() - self.last_contact > 2.5 * interval + 0.5:
                return
            # ±10% jitter so that thousands of agents do not beat in step.
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            # Reports not acknowledged yet (e.g. the ack was lost) are sent again — before the
            # heartbeat, whose list of running attempts the controller reads as "everything
            # else I was given is gone".
            for status in self.runner.pending_reports():
                outbox.put_nowait(agent_pb2.AgentMessage(status=status))
            self._beat(outbox)

    def _beat(self, outbox: asyncio.Queue) -> None:
        self._beat_seq += 1
        if len(self._beats_sent) > 64:  # answers lost for good: forget the oldest
            self._beats_sent.pop(min(self._beats_sent))
        self._beats_sent[self._beat_seq] = time.monotonic()
        outbox.put_nowait(
            agent_pb2.AgentMessage(
                heartbeat=agent_pb2.Heartbeat(
                    seq=self._beat_seq,
                    running=self.runner.running_refs(),
                    draining=self.draining,
                    free_port=free_port(),
                )
            )
        )

    async def drain(self, grace: float | None = None) -> int:
        """Drain this node before the agent exits; return how many attempts had to be stopped.

        The controller hears at once (a heartbeat saying so) and places nothing new here;
        an assignment already on its way is handed back unstarted. Running attempts get
        ``grace`` seconds (default ``config.drain_grace``) to finish; the rest are stopped
        (SIGTERM, ``stop_grace``, SIGKILL) with reason ``drained``, which the controller
        retries elsewhere without using up ``retries``. Their final reports go out before
        this returns, while a controller answers (at most a few seconds more).
        """
        grace = self.config.drain_grace if grace is None else grace
        node = self.config.node
        self.draining = True
        self.runner.refusing = f"node {node} is shutting down"
        if self._outbox is not None:
            self._beat(self._outbox)
        log.info("draining", node=node, running=len(self.runner.attempts), grace=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.runner.attempts and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stopped = self.runner.fence(
            f"node {node} shut down; the attempt had not finished within its drain grace "
            f"({grace:g}s)",
            self.config.stop_grace,
            DRAINED,
        )
        tasks = [a.task for a in self.runner.attempts.values() if a.task]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.stop_grace + 5)
        # Reports not acknowledged when the agent exits stay in the work dir and are sent by
        # the next agent here; waiting a little spares the controller that detour.
        ack_deadline = loop.time() + 5
        while self.runner.unacked and self.connected.is_set() and loop.time() < ack_deadline:
            await asyncio.sleep(0.05)
        log.info("drained", node=node, stopped=stopped)
        return stopped

    async def stop(self, grace: float | None = None, leave_running: bool | None = None) -> None:
        """Stop attempts and disconnect. Idempotent.

        Args:
            grace: SIGTERM-to-SIGKILL grace for attempts; default ``config.stop_grace``.
            leave_running: Leave attempts running in the runtime for the next agent on this
                node to adopt (``docker``); default ``config.leave_running``.
        """
        self._stop.set()
        # First: attempts left running for the next agent are no longer in this one's runner,
        # and the next agent may own the work dir before this task would end.
        self._stop_cleaner()
        await self.runner.stop_all(
            self.config.stop_grace if grace is None else grace,
            self.config.leave_running if leave_running is None else leave_running,
        )
        close = getattr(self.runtime, "close", None)
        if close is not None:
            await close()
        self._lock.release()
        self.metrics.close()
        self.tracer_provider.shutdown()
