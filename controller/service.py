"""gRPC servicers: the client-facing ControllerService and the agent-facing AgentService.

Handlers translate messages and delegate to the :class:`Engine`; errors become gRPC statuses
in one place (:func:`tether.controller.errors.grpc_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from tether.api.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from tether.controller import lifecycle as lc
from tether.controller.auth import Role, current_principal
from tether.controller.engine import Engine
from tether.controller.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotLeader,
    PermissionDenied,
    StoreUnavailable,
    Unauthenticated,
    grpc_errors,
    status_for,
    trailers_for,
)
from tether.controller.lifecycle import IllegalTransition
from tether.controller.logs import LogRouter
from tether.controller.records import AgentSession
from tether.controller.run_span import new_run_trace, parse_traceparent
from tether.controller.secrets import NO_KEY, Secrets
from tether.controller.tokens import TokenStore
from tether.sdk.certs import CertError, verify_node
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.telemetry import (
    context_from_metadata,
    context_from_traceparent,
    exports_spans,
    get_logger,
)
from tether.sdk.validation import LIMITS

__all__ = ["AgentServicer", "ControllerServicer"]

log = get_logger("controller.service")
_PROOF_TIMEOUT = 10.0
_NODE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-")


_MAX_REASON = 1024


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidSpecError([FieldViolation(field, "must not be empty")])


def _bounded(value: str, field: str, limit: int, name: str = "max_id_length") -> None:
    # Checked before any lookup: a 10 MB id must not become a 10 MB etcd key.
    if len(value) > limit:
        raise InvalidSpecError(
            [FieldViolation(field, f"{len(value)} characters; at most {limit} (limit {name})")]
        )


class _LeaderOnly:
    """Servicers reach the engine only while this controller leads."""

    def __init__(self, current_engine: Callable[[], Engine | None]) -> None:
        self._current_engine = current_engine

    def _check_ids(self, **fields: str) -> None:
        """Refuse an id (a run id, a task name) longer than the configured limit."""
        engine = self._current_engine()
        limit = (engine.config.limits if engine else LIMITS).max_id_length
        for field, value in fields.items():
            _bounded(value, field, limit)

    @property
    def engine(self) -> Engine:
        engine = self._current_engine()
        if engine is None:
            raise NotLeader("this controller is standing by; retry with the leader")
        return engine


class ControllerServicer(_LeaderOnly, controller_pb2_grpc.ControllerServiceServicer):
    """The API the SDK and CLI use.

    Args:
        current_engine: The engine of the current leadership term (None while standing by).
        tracer: Tracer for submit spans.
        logs: Relays attempt logs from agents; shared with the :class:`AgentServicer`.
        tokens: The user tokens in etcd (served by any controller, leading or not).
        secrets: The mesh's secrets; served by any controller, leading or not.
    """

    def __init__(
        self,
        current_engine: Callable[[], Engine | None],
        tracer: trace.Tracer,
        logs: LogRouter,
        tokens: TokenStore,
        secrets: Secrets | None = None,
    ) -> None:
        super().__init__(current_engine)
        self.tracer = tracer
        self.spans = exports_spans()
        self.logs = logs
        self.tokens = tokens
        self.secrets = secrets
        self._closing = False
        # The tasks of WatchRun and StreamLogs streams waiting for their next item now: what
        # close_streams() cancels.
        self._waiting: set[asyncio.Task] = set()

    def close_streams(self) -> None:
        """End the open watch and log streams now (the server is stopping), with UNAVAILABLE
        so that clients resume elsewhere or later: left open, gRPC's stop cancels their
        handlers after its grace, and logs each cancellation as an unhandled error with a
        traceback."""
        self._closing = True
        for task in list(self._waiting):
            task.cancel()

    async def _until_closing(self, items: AsyncIterator) -> AsyncIterator:
        """``items`` until they end, or until :meth:`close_streams`.

        A stream waiting for its next item is cancelled there; one handing an item to gRPC
        stops after it. (Cancelling only at that wait, rather than racing every item against
        a close signal: that cost a task and a wait per event of a long watch.)
        """
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._closing:
                self._waiting.add(task)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not self._closing:
                        raise  # the client went away, or gRPC ended the call
                    break
                finally:
                    self._waiting.discard(task)
                yield item
            raise NotLeader("controller shutting down")
        finally:
            with contextlib.suppress(Exception):
                await items.aclose()

    @grpc_errors
    async def SubmitWorkflow(self, request, context):
        metadata = dict(context.invocation_metadata() or ())
        ctx = context_from_metadata(metadata) or Context()
        # The run's span (recorded when it ends) is the root; submit is its first child.
        run_traceparent = new_run_trace(ctx)
        start = time.time_ns()
        caller = current_principal()
        try:
            run_id, existing = await self.engine.submit(
                request.spec,
                dict(request.params),
                request.request_id,
                run_traceparent,
                submitted_by=caller.name if caller.authenticated else "",
                parent_traceparent=_valid_traceparent(metadata.get("traceparent", "")),
            )
        except Exception as e:
            # No run was stored, so no run span will be: the caller's span is the parent.
            if self.spans:
                self._submit_span(request, ctx, start, error=e)
            raise
        if self.spans:  # a fifth of a small submit's CPU, for spans nothing would export
            # A resubmit returns the first run, which has a run span of its own already.
            parent = ctx if existing else context_from_traceparent(run_traceparent)
            self._submit_span(request, parent, start, run_id=run_id, existing=existing)
        return controller_pb2.SubmitWorkflowResponse(run_id=run_id, existing=existing)

    def _submit_span(
        self,
        request,
        parent: Context | None,
        start: int,
        run_id: str = "",
        existing: bool = False,
        error: Exception | None = None,
    ) -> None:
        """Record the submit's span, once its outcome says which trace it belongs to."""
        span = self.tracer.start_span(
            f"submit {request.spec.name or 'workflow'}",
            context=parent or Context(),
            kind=trace.SpanKind.SERVER,
            start_time=start,
            attributes={
                "tether.workflow": request.spec.name,
                "tether.tasks": len(request.spec.tasks),
                "tether.run_id": run_id,
                "tether.existing": existing,
            },
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:256]))
        span.end()

    @grpc_errors
    async def GetRun(self, request, context):
        self._check_ids(run_id=request.run_id)
        _require(request.run_id, "run_id")
        # Filled in place: a big run is not built once more to be copied into the response.
        response = controller_pb2.GetRunResponse()
        await self.engine.get_run(request.run_id, out=response.run)
        return response

    @grpc_errors
    async def ListRuns(self, request, context):
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidSpecError([FieldViolation("page_size", "must be in 0..1000")])
        size = request.page_size or 50
        start = None
        _bounded(request.page_token, "page_token", 1024, "page token length")
        if request.page_token:
            try:
                start = base64.urlsafe_b64decode(request.page_token).decode()
            except (ValueError, UnicodeDecodeError):
                raise InvalidSpecError(
                    [FieldViolation("page_token", "not a token from ListRuns")]
                ) from None
        runs, more = await self.engine.list_runs(size, start)
        token = base64.urlsafe_b64encode(runs[-1].id.encode()).decode() if more else ""
        return controller_pb2.ListRunsResponse(runs=runs, next_page_token=token)

    @grpc_errors
    async def WatchRun(self, request, context):
        self._check_ids(run_id=request.run_id)
        _require(request.run_id, "run_id")
        events = self.engine.watch_run(request.run_id, request.from_revision, request.run_only)
        async for event in self._until_closing(events):
            yield event

    @grpc_errors
    async def CancelRun(self, request, context):
        self._check_ids(run_id=request.run_id, task=request.task)
        _bounded(request.reason, "reason", _MAX_REASON, "reason length")
        _require(request.run_id, "run_id")
        caller = current_principal()
        if not caller.may(Role.OPERATOR):
            run = await self.engine.get_run(request.run_id, with_tasks=False)
            if run.submitted_by != caller.name:
                raise PermissionDenied(
                    f"CancelRun of a run {caller.name!r} did not submit needs role operator"
                )
        if await self.engine.ensure_loaded(request.run_id) is None:
            # Finished runs leave the engine's cache; etcd says whether it exists at all.
            run = await self.engine.get_run(request.run_id, with_tasks=False)
            raise FailedPrecondition(f"run {request.run_id} already {lc.run_state_name(run.state)}")
        await self.engine.cancel(request.run_id, request.task, request.reason)
        return controller_pb2.CancelRunResponse()

    @grpc_errors
    async def StreamLogs(self, request, context):
        self._check_ids(run_id=request.run_id, task=request.task)
        chunks = self.logs.stream(
            lambda: self.engine, request.run_id, request.task, request.attempt, request.follow
        )
        async for data in self._until_closing(chunks):
            yield data

    @grpc_errors
    async def CordonNode(self, request, context):
        _require(request.node, "node")
        await self.engine.set_node_control(request.node, cordoned=True)
        return controller_pb2.CordonNodeResponse()

    @grpc_errors
    async def UncordonNode(self, request, context):
        _require(request.node, "node")
        await self.engine.set_node_control(request.node, cordoned=False)
        return controller_pb2.UncordonNodeResponse()

    @grpc_errors
    async def DrainNode(self, request, context):
        _require(request.node, "node")
        deadline = request.deadline.ToNanoseconds() / 1e9 if request.HasField("deadline") else 600
        if deadline < 0:
            raise InvalidSpecError([FieldViolation("deadline", "must not be negative")])
        await self.engine.set_node_control(
            request.node, cordoned=True, draining=True, deadline=deadline
        )
        return controller_pb2.DrainNodeResponse()

    @grpc_errors
    async def ListNodes(self, request, context):
        return controller_pb2.ListNodesResponse(nodes=await self.engine.list_nodes())

    def _secrets(self) -> Secrets:
        if self.secrets is None:
            raise FailedPrecondition(NO_KEY)
        return self.secrets

    @grpc_errors
    async def SetSecret(self, request, context):
        replaced = await self._secrets().set(request.name, request.value)
        return controller_pb2.SetSecretResponse(replaced=replaced)

    @grpc_errors
    async def ListSecrets(self, request, context):
        return controller_pb2.ListSecretsResponse(names=await self._secrets().names())

    @grpc_errors
    async def DeleteSecret(self, request, context):
        await self._secrets().delete(request.name)
        return controller_pb2.DeleteSecretResponse()

    @grpc_errors
    async def BootstrapAcl(self, request, context):
        token, info = await self.tokens.bootstrap(request.name)
        return controller_pb2.BootstrapAclResponse(token=token, info=info)

    @grpc_errors
    async def CreateToken(self, request, context):
        ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
        if request.HasField("ttl") and ttl < 0.001:
            # 0 would mean "never expires": a short-lived token asked for must not become that.
            raise InvalidSpecError([FieldViolation("ttl", "must be at least 1ms")])
        token, info = await self.tokens.create(
            request.name, request.role, ttl, current_principal().name
        )
        return controller_pb2.CreateTokenResponse(token=token, info=info)

    @grpc_errors
    async def ListTokens(self, request, context):
        return controller_pb2.ListTokensResponse(tokens=await self.tokens.list())

    @grpc_errors
    async def RevokeToken(self, request, context):
        await self.tokens.revoke(request.name)
        return controller_pb2.RevokeTokenResponse()


class AgentServicer(_LeaderOnly, agent_pb2_grpc.AgentServiceServicer):
    """One bidirectional stream per agent.

    Args:
        current_engine: The engine of the current leadership term (None while standing by).
        logs: Where the agents' log chunks go; shared with the :class:`ControllerServicer`.
    """

    def __init__(
        self,
        current_engine: Callable[[], Engine | None],
        logs: LogRouter,
        node_ca: bytes = b"",
    ) -> None:
        super().__init__(current_engine)
        self.logs = logs
        # With a CA, every agent proves its node with a certificate the CA issued.
        self.node_ca = node_ca

    async def _check_proof(
        self, reg: agent_pb2.Register, challenge: bytes, request_iterator
    ) -> None:
        """Check the agent's answer to ``challenge``: signed by its node certificate's key,
        a certificate the CA issued for the node it registers as.

        Raises:
            Unauthenticated: No certificate, one the CA did not issue, or a wrong signature.
            PermissionDenied: The certificate is for another node than the one registered.
        """
        if not reg.certificate:
            raise Unauthenticated(
                f"node {reg.node}: no node certificate; start the agent with --tls-cert and "
                "--tls-key (a certificate from 'tether certs issue node NAME')"
            )
        try:
            answer = await asyncio.wait_for(anext(aiter(request_iterator)), _PROOF_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            raise Unauthenticated(f"node {reg.node}: no answer to the node challenge") from None
        if answer.WhichOneof("msg") != "proof":
            raise Unauthenticated(f"node {reg.node}: expected the answer to the node challenge")
        try:
            name = verify_node(
                self.node_ca, reg.certificate, challenge, reg.node, answer.proof.signature
            )
        except CertError as e:
            raise Unauthenticated(f"node {reg.node}: {e}") from None
        if name != reg.node:
            raise PermissionDenied(
                f"agent registers as node '{reg.node}' but its certificate is for node "
                f"'{name}'; use --name {name} or that node's certificate"
            )

    async def Connect(self, request_iterator, context):
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("msg") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be register")
        reg = first.register
        problem = _check_register(reg)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        session = AgentSession(reg.node, batches=reg.batches)
        challenge = secrets.token_bytes(32)
        if self.node_ca:
            yield agent_pb2.ControllerMessage(
                challenge=agent_pb2.NodeChallenge(challenge=challenge)
            )
        try:
            if self.node_ca:
                await self._check_proof(reg, challenge, request_iterator)
            # One engine for the whole stream: if leadership changes, the stream ends.
            engine = self.engine
            registered = await engine.register(session, reg)
        except (AlreadyExists, PermissionDenied, Unauthenticated) as e:
            code, msg = status_for(e)
            log.warning("registration refused", node=reg.node, code=code.name, error=msg)
            await context.abort(code, msg)
        except (NotLeader, StoreUnavailable) as e:  # the agent goes to the leader, or waits
            code, msg = status_for(e)
            await context.abort(code, msg, trailing_metadata=trailers_for(e))
        except Exception as e:  # tell the agent to retry; keep serving others
            log.warning("registration failed", node=reg.node, error=str(e))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"registration failed: {e}")
        registered.batches = True
        yield agent_pb2.ControllerMessage(registered=registered)
        reader = asyncio.create_task(self._read(engine, session, request_iterator))
        try:
            async for msg in session.outgoing():
                yield msg
            # The reader closed the session over a message it refuses: say so to the agent.
            if reader.done() and not reader.cancelled() and (refused := reader.result()):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        finally:
            reader.cancel()
            engine.disconnected(session)
            self.logs.disconnected(session)

    async def _read(self, engine: Engine, session: AgentSession, request_iterator) -> str:
        """Apply the agent's messages until the stream or the session ends; the reason to
        refuse the stream with INVALID_ARGUMENT, if that is why it ended."""
        try:
            async for msg in request_iterator:
                if msg.WhichOneof("msg") != "batch":
                    if not self._on_message(engine, session, msg):
                        break
                    continue
                for one in msg.batch.messages:
                    if one.WhichOneof("msg") == "batch":
                        log.warning("nested agent batch refused", node=session.node)
                        return "batch.messages: a batch must not hold another batch"
                    if not self._on_message(engine, session, one):
                        return ""
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken stream ends this session only
            log.info("agent stream ended", node=session.node, error=str(e))
        finally:
            session.close()
        return ""

    def _on_message(self, engine: Engine, session: AgentSession, msg) -> bool:
        """Apply one agent message; False: the session must end (its lease expired)."""
        kind = msg.WhichOneof("msg")
        try:
            if kind == "status":
                engine.on_status(session, msg.status)
            elif kind == "event":
                engine.on_event(session, msg.event)
            elif kind == "log_chunk":
                self.logs.on_chunk(session, msg.log_chunk)
            elif kind == "heartbeat":
                if not engine.heartbeat(session, msg.heartbeat):
                    log.warning("lease expired; asking agent to re-register", node=session.node)
                    return False
                session.send(
                    agent_pb2.ControllerMessage(
                        heartbeat_ack=agent_pb2.HeartbeatAck(seq=msg.heartbeat.seq)
                    )
                )
        except IllegalTransition as e:
            # A refused move is a bug to see in the logs, not a reason to drop the node.
            log.error("refused state change", node=session.node, error=str(e))
        return True


def _check_register(reg: agent_pb2.Register) -> str:
    if (
        not reg.node
        or len(reg.node) > 63
        or set(reg.node) - _NODE_NAME_CHARS
        or not reg.node[0].isalnum()
        or not reg.node[-1].isalnum()
    ):
        return "register.node: use 1-63 lowercase letters, digits, '.', '-'"
    if len(reg.node_id) > 64:
        return "register.node_id: at most 64 characters"
    if len(reg.certificate) > 64 * 1024:
        return "register.certificate: at most 64 KiB"
    c = reg.capacity
    if not math.isfinite(c.cpu) or c.cpu < 0 or c.memory_bytes < 0 or c.gpu < 0:
        return "register.capacity: must be finite and not negative"
    if len(reg.address) > 253:
        return "register.address: at most 253 characters"
    if not 0 <= reg.free_port <= 65535:
        return "register.free_port: must be in 0..65535"
    return ""


def _valid_traceparent(value: str) -> str:
    """``value`` if it is a W3C traceparent (the caller's span), else ``""``."""
    return value if parse_traceparent(value) else ""
