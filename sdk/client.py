"""The Python client of a Tether controller.

from tether.sdk import Client, Workflow

client = Client("127.0.0.1:7070")
run = client.submit(Workflow.from_yaml("examples/fraud_detection.yaml"))
final = run.wait()
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

import grpc
from opentelemetry import trace

from tether.api.v1 import controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk.address import split_addresses
from tether.sdk.constants import DEFAULT_CONTROLLER, INT32_MAX, INT64_MAX
from tether.sdk.errors import (
    FieldViolation,
    InvalidSpecError,
    TetherError,
    TimeoutError,
    UnavailableError,
    from_rpc_error,
    leader_of,
)
from tether.sdk.quantities import parse_duration
from tether.sdk.spec import Workflow
from tether.sdk.states import TERMINAL_RUN_STATES, RunState
from tether.sdk.telemetry import current_traceparent
from tether.sdk.validation import validate_params, validate_workflow

__all__ = [
    "DEFAULT_CONTROLLER",
    "LOCAL_CHECK_TASKS",
    "TERMINAL_RUN_STATES",
    "Client",
    "LogChunk",
    "RunHandle",
]

# Workflows up to this many tasks are checked before they are sent, too.
LOCAL_CHECK_TASKS = 10_000


# Reads are retried on UNAVAILABLE by gRPC itself; writes are not (submit carries a request id
# when the caller wants retries to be safe).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "tether.v1.ControllerService", "method": m}
                    # SubmitWorkflow always carries a request id (see submit), so a retry
                    # returns the run the first attempt created instead of starting another.
                    for m in ("GetRun", "ListRuns", "ListNodes", "SubmitWorkflow")
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)

_tracer = trace.get_tracer("tether.sdk")


class LogChunk(NamedTuple):
    """A piece of an attempt's log, as :meth:`Client.logs` yields it.

    Attributes:
        stream: ``"stdout"`` or ``"stderr"``.
        data: Raw bytes (at most 64 KiB), in order within their stream; not split at lines.
        attempt: The attempt the bytes belong to (useful when asking for the current one).
    """

    stream: str
    data: bytes
    attempt: int


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A call's details with extra metadata (gRPC's own type cannot be built directly)."""


class _TraceContext(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Every call carries the caller's W3C trace context (``traceparent``), if it has one,
    and the bearer token, if the client has one."""

    def __init__(self, token: str = "") -> None:
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()

    def _with_context(self, details):
        traceparent = current_traceparent()
        extra = (*self._auth, *((("traceparent", traceparent),) if traceparent else ()))
        if not extra:
            return details
        metadata = (*(details.metadata or ()), *extra)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_context(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_context(client_call_details), request)


class Client:
    """A connection to a controller.

    Args:
        address: ``host:port`` of the controller; defaults to ``$TETHER_CONTROLLER`` or
            ``127.0.0.1:7070`` (where ``tether dev`` listens).
        timeout: Deadline of each unary call, seconds.
        tls_ca: PEM file of the CA the controller's certificate chains to; connects over TLS.
            Defaults to ``$TETHER_TLS_CA``; without either the connection is plaintext.
        token: Bearer token sent with every call (see ``tether tokens``); defaults to
            ``$TETHER_TOKEN``. Controllers with auth refuse calls without one.

    Raises:
        ValueError: an address has no port (gRPC would silently dial port 443).
    """

    def __init__(
        self,
        address: str | None = None,
        timeout: float = 30.0,
        tls_ca: str | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address or os.environ.get("TETHER_CONTROLLER") or DEFAULT_CONTROLLER
        token = os.environ.get("TETHER_TOKEN", "") if token is None else token
        self.timeout = timeout
        self.tls_ca = tls_ca if tls_ca is not None else os.environ.get("TETHER_TLS_CA", "")
        options = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
            # A client keeps its channels, and gRPC waits longer and longer (up to 120 s)
            # between reconnects to a controller that is down: a wait() or watch riding out
            # a controller's restart would go on minutes after it is back. Tried again at
            # least every 2 s instead, as follow() asks again.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # A controller whose host died or was cut off sends no reset: without pings, a
            # watch or wait() on it would hang for ever after a standby took over. (The
            # controller allows a ping every 5 s; gRPC would stop after two without data.)
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        # Several comma-separated addresses name the controllers of an HA deployment: calls go
        # to one, and move to the next when it answers UNAVAILABLE (down, or standing by).
        self._options = options
        self._token = token.strip()
        self._addresses: list[str] = []
        self._channels: list[grpc.Channel] = []
        self._stubs: list[controller_pb2_grpc.ControllerServiceStub] = []
        for a in split_addresses(self.address):
            self._add_controller(a)
        self._current = 0

    def _add_controller(self, address: str) -> int:
        """Open a channel to one more controller; return its index."""
        channel = self._channel(address, self._options)
        traced = grpc.intercept_channel(channel, _TraceContext(self._token))
        self._addresses.append(address)
        self._channels.append(channel)
        self._stubs.append(controller_pb2_grpc.ControllerServiceStub(traced))
        return len(self._stubs) - 1

    def _channel(self, address: str, options: list) -> grpc.Channel:
        if not self.tls_ca:
            return grpc.insecure_channel(address, options=options)
        try:
            ca = Path(self.tls_ca).read_bytes()
        except OSError as e:
            raise TetherError(f"tls_ca: cannot read {self.tls_ca}: {e.strerror}") from None
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=options)

    @property
    def _stub(self) -> controller_pb2_grpc.ControllerServiceStub:
        return self._stubs[self._current]

    def _next_controller(self, err: grpc.RpcError | None = None) -> bool:
        """Move to the leader a standby named in ``err`` (True), else to the next controller."""
        leader = leader_of(err) if err is not None else ""
        if leader and leader != self._addresses[self._current]:
            known = leader in self._addresses
            self._current = self._addresses.index(leader) if known else self._add_controller(leader)
            return True
        self._current = (self._current + 1) % len(self._stubs)
        return False

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, **kw):
        timeout = kw.pop("timeout", self.timeout)
        tries = len(self._stubs) + 1  # each controller, and the leader a standby names
        for tried in range(tries):
            try:
                return getattr(self._stub, method)(request, timeout=timeout, **kw)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and tried + 1 < tries:
                    if self._next_controller(e) or tried + 1 < len(self._stubs):
                        continue
                err = from_rpc_error(e)
                hint = self._tls_hint(err)
                if hint:
                    err.message = f"{err.message} ({hint})"
                    err.args = (err.message,)
                raise err from None
        raise AssertionError("unreachable")

    def _tls_hint(self, err: TetherError) -> str:
        """What a connection refused for speaking TLS or not, to the other kind, means."""
        text = str(err)
        if not self.tls_ca and "Socket closed" in text:
            return "does the controller serve TLS? pass --tls-ca or set TETHER_TLS_CA"
        if self.tls_ca and "WRONG_VERSION_NUMBER" in text:
            return "the controller serves plaintext: drop --tls-ca / TETHER_TLS_CA"
        return ""

    def submit(
        self,
        workflow: Workflow | t.WorkflowSpec,
        params: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> RunHandle:
        """Submit a workflow and return a handle to its run.

        Args:
            workflow: A :class:`Workflow` or an API ``WorkflowSpec``.
            params: Run parameters, names and values both strings (InvalidSpecError
                ``params.<name>`` otherwise: ``str(5)`` is for the caller to choose).
            request_id: Idempotency key: submitting it again returns the first run. When
                empty, a random one is used so that retries after UNAVAILABLE are safe.

        Raises:
            InvalidSpecError: the spec or its params are invalid (checked locally, then by the
                controller; a workflow of more than ``LOCAL_CHECK_TASKS`` tasks by the
                controller only).
            UnavailableError: the controller cannot be reached.
        """
        params = dict(params or {})
        _check_params(params)
        request = controller_pb2.SubmitWorkflowRequest(
            params=params, request_id=request_id or uuid.uuid4().hex
        )
        if isinstance(workflow, Workflow):
            workflow._fill_proto(request.spec)
        else:
            request.spec.CopyFrom(workflow)
        spec = request.spec
        # The controller checks every spec and its params; a big one is not checked twice
        # (seconds for 100,000 tasks), and its errors come back as the same InvalidSpecError.
        if len(spec.tasks) <= LOCAL_CHECK_TASKS:
            if isinstance(workflow, Workflow):
                validate_workflow(spec, params=params)
            else:
                validate_params(spec, params)
        with _tracer.start_as_current_span(f"submit {spec.name}", kind=trace.SpanKind.CLIENT):
            resp = self._call("SubmitWorkflow", request)
        return RunHandle(self, resp.run_id, existing=resp.existing)

    def run(self, run_id: str) -> RunHandle:
        """A handle to an existing run."""
        return RunHandle(self, run_id)

    def get_run(self, run_id: str, timeout: float | None = None) -> t.Run:
        """The run with all its tasks (``timeout``: seconds for the call, instead of the
        client's). Raises NotFoundError."""
        request = controller_pb2.GetRunRequest(run_id=run_id)
        return self._call("GetRun", request, timeout=timeout or self.timeout).run

    def list_runs(self, page_size: int = 50) -> Iterator[t.Run]:
        """Every run, newest first (fetched a page at a time)."""
        _check_int("page_size", page_size, INT32_MAX)
        token = ""
        while True:
            resp = self._call(
                "ListRuns",
                controller_pb2.ListRunsRequest(page_size=page_size, page_token=token),
            )
            yield from resp.runs
            token = resp.next_page_token
            if not token:
                return

    def watch(
        self,
        run_id: str,
        from_revision: int = 0,
        timeout: float | None = None,
        run_only: bool = False,
    ) -> Iterator[controller_pb2.RunEvent]:
        """Stream a run's changes until it finishes; the first event is a snapshot unless
        resuming ``from_revision``. ``timeout`` bounds the whole stream (TimeoutError).
        ``run_only``: the run's own changes alone (no tasks, no task events)."""
        _check_int("from_revision", from_revision, INT64_MAX)
        request = controller_pb2.WatchRunRequest(
            run_id=run_id, from_revision=from_revision, run_only=run_only
        )
        try:
            yield from self._stub.WatchRun(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._next_controller(e)  # callers resume from the last revision
            raise from_rpc_error(e) from None

    def follow(
        self,
        run_id: str,
        from_revision: int = 0,
        timeout: float | None = None,
        run_only: bool = False,
        on_retry: Callable[[TetherError], None] | None = None,
    ) -> Iterator[controller_pb2.RunEvent]:
        """Like :meth:`watch`, but rides out controllers going away until the run finishes.

        When no controller can be reached (a restart, a failover: ``UNAVAILABLE``) or the
        stream ends early, it watches again from the revision before the last one it yielded
        and skips what it yielded already (one transaction changes many tasks at one
        revision), so no change is missed or repeated, after a pause that grows (to 2 s)
        while no controller answers; with several controllers (``"a:7070,b:7070"``) each is
        tried in turn, and a standby
        that names the leader sends it there. A resume whose history was compacted starts
        again from a snapshot. The last event is the run's final state.

        Args:
            run_id: The run.
            from_revision: Resume after this revision instead of starting with a snapshot.
            timeout: Seconds for the whole follow, outages included; None: no limit.
            run_only: The run's own changes alone (no tasks, no task events).
            on_retry: Called with each error ridden out (``UNAVAILABLE``, or ``OUT_OF_RANGE``
                before a fresh snapshot), before the pause.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (from the last error ridden out,
                if any).
            NotFoundError, PermissionDeniedError, InvalidSpecError, ...: at once; only
                unavailability is retried.
        """
        return _follow(self, run_id, _Patience(run_id, timeout), from_revision, run_only, on_retry)

    def logs(
        self, run_id: str, task: str, attempt: int = 0, follow: bool = False
    ) -> Iterator[LogChunk]:
        """Stream the stdout and stderr of one attempt of a task from the node that ran it.

        The node keeps each attempt's output on its disk, up to the agent's log limit (64 MiB
        per stream by default; a note at the end says when output was cut). Errors are
        raised while iterating; stopping early (``break``, ``close()``) ends the stream on the
        controller and the node.

        Args:
            run_id: The run.
            task: The task's name.
            attempt: Attempt number (1 is the first); 0 means the task's current attempt.
            follow: Keep streaming while the attempt runs and end when it does. Following a
                task that has not started yet waits for its attempt to start.

        Yields:
            :class:`LogChunk` tuples ``(stream, data, attempt)``.

        Raises:
            InvalidSpecError: empty ``run_id`` or ``task``, or ``attempt`` < 0, over
                2147483647 or not an int.
            NotFoundError: no such run, task or attempt, or the node no longer has the logs.
            UnavailableError: the node that ran the attempt is not connected (``reason``
                ``"node_unavailable"``; also when it leaves mid-stream), or no controller can
                be reached.
        """
        _check_int("attempt", attempt, INT32_MAX)
        request = controller_pb2.StreamLogsRequest(
            run_id=run_id, task=task, attempt=attempt, follow=follow
        )
        rounds = len(self._stubs) + 1  # each controller, and the leader a standby names
        for tried in range(rounds):
            call = self._stub.StreamLogs(request)
            started = False
            try:
                for data in call:
                    started = True
                    yield LogChunk(data.stream, data.data, data.attempt)
                return
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if err.code != grpc.StatusCode.UNAVAILABLE or err.reason == "node_unavailable":
                    raise err from None
                # This controller is down or standing by: the next one may lead. A stream cut
                # mid-way is not resumed (it would repeat output); the caller asks again.
                followed = self._next_controller(e)
                last = tried + 1 == rounds or (tried + 2 >= rounds and not followed)
                if started or last:
                    raise err from None
            finally:
                call.cancel()  # a no-op once the stream has ended

    def cancel(self, run_id: str, task: str = "", reason: str = "") -> None:
        """Cancel a run, or one task of it."""
        self._call(
            "CancelRun",
            controller_pb2.CancelRunRequest(run_id=run_id, task=task, reason=reason),
        )

    def nodes(self) -> list[t.Node]:
        """The registered nodes."""
        return list(self._call("ListNodes", controller_pb2.ListNodesRequest()).nodes)

    def cordon_node(self, node: str) -> None:
        """Stop new placements on ``node``; what runs there goes on. Needs the operator role."""
        self._call("CordonNode", controller_pb2.CordonNodeRequest(node=node))

    def uncordon_node(self, node: str) -> None:
        """Undo a cordon or drain of ``node``."""
        self._call("UncordonNode", controller_pb2.UncordonNodeRequest(node=node))

    def drain_node(self, node: str, deadline: float | None = None) -> None:
        """Cordon ``node`` and let its attempts finish; after ``deadline`` seconds (None: 10
        minutes) stop what remains, to be retried elsewhere without using up retries."""
        req = controller_pb2.DrainNodeRequest(node=node)
        if deadline is not None:
            try:
                req.deadline.FromNanoseconds(int(parse_duration(deadline) * 1e9))
            except ValueError as e:
                raise InvalidSpecError([FieldViolation("deadline", str(e))]) from None
        self._call("DrainNode", req)

    def set_secret(self, name: str, value: str | bytes) -> bool:
        """Create or replace the secret ``name``; return whether it replaced a value.

        Tasks refer to it as ``env={"VAR": Secret(name)}``. Needs the admin role.

        Raises:
            InvalidSpecError: bad name, or the value is empty, not UTF-8, holds a NUL byte
                or is over 32 KiB.
            FailedPreconditionError: the controller runs without ``--secrets-key-file``.
        """
        data = value.encode() if isinstance(value, str) else bytes(value)
        req = controller_pb2.SetSecretRequest(name=name, value=data)
        return self._call("SetSecret", req).replaced

    def list_secrets(self) -> list[str]:
        """The names of all secrets, sorted (values are never returned)."""
        return list(self._call("ListSecrets", controller_pb2.ListSecretsRequest()).names)

    def delete_secret(self, name: str) -> None:
        """Delete the secret ``name``. Raises NotFoundError when there is none."""
        self._call("DeleteSecret", controller_pb2.DeleteSecretRequest(name=name))

    def bootstrap_acl(self, name: str = "admin") -> tuple[str, t.TokenInfo]:
        """Create the first admin token (once per mesh); return it and its description.

        Raises:
            FailedPreconditionError: the mesh was bootstrapped already.
        """
        resp = self._call("BootstrapAcl", controller_pb2.BootstrapAclRequest(name=name))
        return resp.token, resp.info

    def create_token(
        self, name: str, role: str, ttl: float | None = None
    ) -> tuple[str, t.TokenInfo]:
        """Create a token with ``role`` (viewer, submitter, operator, admin) that expires
        after ``ttl`` seconds (None: never); return it (shown only now) and its description.
        Needs an admin token."""
        request = controller_pb2.CreateTokenRequest(name=name, role=role)
        if ttl is not None:
            if not (math.isfinite(ttl) and ttl >= 0.001):
                raise InvalidSpecError([FieldViolation("ttl", "must be at least 1ms")])
            request.ttl.FromNanoseconds(int(ttl * 1e9))
        resp = self._call("CreateToken", request)
        return resp.token, resp.info

    def list_tokens(self) -> list[t.TokenInfo]:
        """Every token's name, role and times (never the tokens). Needs an admin token."""
        return list(self._call("ListTokens", controller_pb2.ListTokensRequest()).tokens)

    def revoke_token(self, name: str) -> None:
        """Revoke a token: every controller refuses it from now on. Needs an admin token."""
        self._call("RevokeToken", controller_pb2.RevokeTokenRequest(name=name))


def _check_int(field: str, value: object, most: int) -> None:
    """Refuse what the request's integer field cannot hold: protobuf's own errors ("Value
    out of range", "bad argument type") name no field. A negative value it can hold is left
    to the controller, whose refusal is the documented one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(
            [FieldViolation(field, f"must be an integer, got {type(value).__name__}")]
        )
    if not -most - 1 <= value <= most:
        raise InvalidSpecError([FieldViolation(field, f"must be in 0..{most}, got {value}")])


def _check_params(params: dict) -> None:
    """Names and values of run parameters are strings (the API's map<string, string>)."""
    problems = []
    for key, value in params.items():
        if not isinstance(key, str):
            problems.append(
                FieldViolation(
                    f"params[{key!r}]", f"names must be strings, got {type(key).__name__}"
                )
            )
        elif not isinstance(value, str):
            problems.append(
                FieldViolation(f"params.{key}", f"must be a string, got {type(value).__name__}")
            )
    if problems:
        raise InvalidSpecError(problems)


class RunHandle:
    """A submitted run."""

    def __init__(self, client: Client, run_id: str, existing: bool = False) -> None:
        self.client = client
        self.id = run_id
        self.existing = existing

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    def status(self) -> t.Run:
        """The run and its tasks now."""
        return self.client.get_run(self.id)

    def state(self) -> RunState:
        """The run's state now, by name: ``run.state().name == "RUNNING"``."""
        return RunState(self.status().state)

    def watch(self, from_revision: int = 0) -> Iterator[controller_pb2.RunEvent]:
        """Every change of the run until it finishes; resumes from a revision."""
        return self.client.watch(self.id, from_revision)

    def wait(self, timeout: float | None = None) -> t.Run:
        """Block until the run finishes; return it with its tasks.

        A controller that goes away meanwhile (a restart, a failover to another of the
        client's controllers) does not end the wait: it is asked again with growing pauses,
        as :meth:`Client.follow` does, until ``timeout``. Errors other than unavailability
        (``NotFoundError``, ``PermissionDeniedError``, ...) raise at once.

        Args:
            timeout: Seconds to wait in all, outages included; None: as long as it takes.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (also Python's built-in
                ``TimeoutError``).
        """
        patience = _Patience(self.id, timeout)
        for _ in _follow(self.client, self.id, patience, run_only=True):
            pass  # the last event is the final state; the run with its tasks is read below
        # Within what is left of ``timeout``: a hung controller must not hold it longer.
        return _ride_out(
            lambda: self.client.get_run(
                self.id, timeout=patience.call_timeout(self.client.timeout)
            ),
            patience,
        )

    def logs(self, task: str, attempt: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        """The stdout and stderr of one attempt of ``task``; see :meth:`Client.logs`."""
        return self.client.logs(self.id, task, attempt, follow)

    def outputs(self) -> dict[str, object]:
        """Each task's output (parsed JSON), for tasks that wrote one."""
        return {
            tk.spec.name: json.loads(tk.outputs_json)
            for tk in self.status().tasks
            if tk.outputs_json
        }


# Reasons of a controller that answered but cannot serve yet (standing by, cut off from etcd):
# it will within a leader TTL, so it is asked again soon rather than after a longer pause.
_SOON = frozenset({"not_leader", "store_unavailable"})
_SOON_MOST = 0.5


class _Patience:
    """How long a wait for ``run_id`` may still take, and the pauses between its tries."""

    def __init__(
        self, run_id: str, timeout: float | None, first: float = 0.1, most: float = 2.0
    ) -> None:
        self.run_id = run_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.first = first
        self.most = most
        self.delay = first
        self.last: TetherError | None = None  # the last error ridden out, a timeout's cause

    def left(self) -> float | None:
        """Seconds until the deadline (0 once past it); None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> TimeoutError:
        """The error to raise once out of time, caused by the outage it was spent in, if any."""
        err = TimeoutError(f"run {self.run_id} did not finish in {self.timeout}s")
        err.__cause__, err.__suppress_context__ = self.last, True
        return err

    def call_timeout(self, default: float) -> float:
        """A call's timeout: ``default``, or less when less time is left."""
        left = self.left()
        return default if left is None else max(0.001, min(default, left))

    def answered(self) -> None:
        """A controller served: the next outage starts with short pauses again."""
        self.delay = self.first
        self.last = None

    def pause(self, err: TetherError) -> None:
        """Sleep before trying again after ``err``; raise TimeoutError once out of time."""
        self.last = err
        left = self.left()
        if left == 0:
            raise self.expired()
        if err.reason in _SOON:
            # Short pauses, but not reset at each answer: through an etcd outage of minutes,
            # every waiting client would ask a struggling controller ten times a second.
            self.delay = min(self.delay, _SOON_MOST)
        # Jitter: the clients of a restarted controller do not all come back in step.
        sleep = random.uniform(self.delay / 2, self.delay)
        self.delay = min(self.delay * 2, self.most)
        time.sleep(sleep if left is None else min(sleep, left))


def _final(ev: controller_pb2.RunEvent) -> bool:
    """Whether ``ev`` is a watch's last event: the run's final state (not a task's change)."""
    state = ev.snapshot.state if ev.HasField("snapshot") else ev.run_state
    return state in TERMINAL_RUN_STATES and not ev.HasField("task")


def _follow(
    client: Client,
    run_id: str,
    patience: _Patience,
    from_revision: int = 0,
    run_only: bool = False,
    on_retry: Callable[[TetherError], None] | None = None,
) -> Iterator[controller_pb2.RunEvent]:
    """:meth:`Client.follow`, for any object with its ``watch`` (``RunHandle.client``)."""
    revision = from_revision
    # What was yielded at ``revision`` one by one (not in a snapshot): each task's name, ""
    # for the run. One etcd transaction changes many tasks at one revision, and a stream may
    # break between them: a resume asks again from the revision before and skips these, so
    # none is lost. (By name, not by content: sent again, an event may carry a newer
    # run_state.)
    at_revision: set[str] = set()
    run_revision = 0  # of the run's state as last yielded
    run_state = 0  # the run's state as last yielded
    while True:
        left = patience.left()
        if left == 0:
            raise patience.expired()
        start = revision - 1 if at_revision and revision > 1 else revision
        try:
            for ev in client.watch(run_id, start, timeout=left, run_only=run_only):
                patience.answered()
                is_task = ev.HasField("task")
                if ev.HasField("snapshot"):
                    at_revision = set()
                elif not is_task and ev.revision <= run_revision:
                    # The run's state no newer than one yielded: a resume restates the state
                    # as of where it resumed (it may have been missed: the run's changes can
                    # come after task changes of later revisions), or sends it again.
                    continue
                elif ev.revision >= revision:
                    who = ev.task.spec.name if is_task else ""
                    if ev.revision > revision:
                        at_revision = set()
                    elif who in at_revision:
                        continue  # yielded before the stream broke
                    at_revision.add(who)
                revision = max(revision, ev.revision)
                if not is_task:
                    run_revision, run_state = ev.revision, ev.run_state
                elif run_revision:
                    # What this follower last said of the run: a resumed stream may know an
                    # older state (its run watch behind), which would take it back.
                    ev.run_state = run_state
                yield ev
                if _final(ev):
                    return
            # Ended without the final state (the run's record was read anew, a leader stepped
            # down): what happened since is asked for again.
            err: TetherError = UnavailableError("the watch ended before the run did")
        except TetherError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise patience.expired() from patience.last
            if e.code == grpc.StatusCode.OUT_OF_RANGE and revision > from_revision:
                # The history since the last change seen was compacted: a snapshot again. A
                # from_revision already compacted is the caller's error, and raises.
                revision = from_revision = 0
                if on_retry is not None:
                    on_retry(e)
                continue
            if e.code != grpc.StatusCode.UNAVAILABLE:
                raise
            err = e
        if on_retry is not None:
            on_retry(err)
        patience.pause(err)


_T = TypeVar("_T")


def _ride_out(call: Callable[[], _T], patience: _Patience) -> _T:
    """``call()``, tried again while no controller is available, until ``patience`` runs out."""
    while True:
        try:
            return call()
        except TetherError as e:
            # A controller that did not answer in time (hung, or cut off without a reset) is
            # asked again while time is left, as one that is down.
            if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            patience.pause(e)
