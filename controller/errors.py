"""Domain errors of the controller and their one mapping to gRPC status codes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import grpc

from tether.sdk.errors import (
    ERROR_REASON_KEY,
    LEADER_KEY,
    MAX_MESSAGE,
    InvalidSpecError,
    shorten,
)
from tether.sdk.telemetry import get_logger

__all__ = [
    "AlreadyExists",
    "Conflict",
    "FailedPrecondition",
    "NodeUnavailable",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "StoreUnavailable",
    "Unauthenticated",
    "abort_for",
    "grpc_errors",
    "status_for",
    "store_unavailable",
    "trailers_for",
]

log = get_logger("controller.errors")
# gRPC's retry pushback: a negative value tells the client's channel not to retry the call.
_NO_RETRY_KEY = "grpc-retry-pushback-ms"


class NotFound(Exception):
    """The named run, task or node does not exist."""


class FailedPrecondition(Exception):
    """The object's state forbids the request."""


class Conflict(Exception):
    """An etcd compare failed: someone else changed the record first."""


class StoreUnavailable(Exception):
    """etcd cannot be reached."""


class NotLeader(Exception):
    """This controller is not (or no longer) the leader; another one serves.

    Args:
        message: What to tell the caller.
        leader: The leader's advertised address when known; sent to the caller in trailing
            metadata (:data:`~tether.sdk.errors.LEADER_KEY`) so it goes straight there.
    """

    def __init__(self, message: str, leader: str = "") -> None:
        super().__init__(message)
        self.leader = leader


def store_unavailable(exc: BaseException, endpoints: str = "") -> StoreUnavailable:
    """A :class:`StoreUnavailable` saying why etcd failed: no quorum, or no member reached.

    etcd answers "no leader" or lets a request time out when its members cannot form a
    quorum, and gRPC answers UNAVAILABLE when no member accepts a connection.
    """
    detail = str(exc) or type(exc).__name__
    where = f" at {endpoints}" if endpoints else ""
    text = detail.lower()
    if "no leader" in text or "timed out" in text or "deadline" in text or "timeout" in text:
        why = f"etcd has no quorum (or does not answer in time){where}"
    else:
        why = f"etcd is unreachable{where} (no member answers, or it has no quorum)"
    return StoreUnavailable(f"{why}: {detail}")


class OutOfRange(Exception):
    """A revision or page token is no longer available."""


class NodeUnavailable(Exception):
    """The node a request must reach (say, for an attempt's logs) is not connected."""


class ResourceExhausted(Exception):
    """A per-request limit was reached (say, a log stream's client fell too far behind)."""


class AlreadyExists(Exception):
    """Something with this name exists, or is held by someone else (say, a node's stream)."""


class Unauthenticated(Exception):
    """The caller did not prove who it is (no or a bad credential)."""


class PermissionDenied(Exception):
    """The caller is known but may not do this."""


class RateLimited(Exception):
    """The caller's token sent requests faster than its rate; retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidSpecError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ABORTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    NotLeader: grpc.StatusCode.UNAVAILABLE,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    NodeUnavailable: grpc.StatusCode.UNAVAILABLE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Reasons sent with the status (trailing metadata, see ERROR_REASON_KEY) where the code alone
# does not tell a client what to do: of these UNAVAILABLEs, only a node being away is not
# helped by asking another controller. Other errors send the code's name.
_REASONS: dict[type[BaseException], str] = {
    NotLeader: "not_leader",
    StoreUnavailable: "store_unavailable",
    NodeUnavailable: "node_unavailable",
}


def _trailers(exc: BaseException, code: grpc.StatusCode) -> tuple[tuple[str, str], ...]:
    reason = next((r for cls, r in _REASONS.items() if isinstance(exc, cls)), code.name.lower())
    if code == grpc.StatusCode.UNAVAILABLE and reason == "unavailable":
        reason = "store_unavailable"  # an etcd error that reached here unwrapped
    if isinstance(exc, NotLeader) and exc.leader:
        # Go to the leader at once: gRPC's own retries would only ask this standby again.
        return ((ERROR_REASON_KEY, reason), (LEADER_KEY, exc.leader), (_NO_RETRY_KEY, "-1"))
    if isinstance(exc, RateLimited):
        return ((ERROR_REASON_KEY, "rate_limited"), *_retry_details(exc, code))
    return ((ERROR_REASON_KEY, reason),)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message an exception is answered with."""
    return _status_for(exc)


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata an exception is answered with (reason; where the leader is)."""
    return _trailers(exc, _status_for(exc)[0])


def _message(exc: BaseException) -> str:
    # InvalidSpecError's message lists its problems cut short already (the SDK's summarize).
    return shorten(str(exc), MAX_MESSAGE)


def _retry_details(exc: RateLimited, code: grpc.StatusCode) -> tuple:
    """google.rpc.RetryInfo in the status details (grpc-status-details-bin), as Google APIs
    send it, so any gRPC client library can read how long to wait."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, int(exc.retry_after * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(exc), details=[detail])
    )
    return tuple(status.trailing_metadata)


async def abort_for(context, exc: BaseException) -> None:
    """End the call with the status for ``exc`` (for code outside the handlers: the guard)."""
    code, msg = _status_for(exc)
    await context.abort(code, msg, trailing_metadata=_trailers(exc, code))


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES.items():
        if isinstance(exc, cls):
            return code, _message(exc)
    from etcd3aio import EtcdError

    if isinstance(exc, EtcdError | ConnectionError | OSError):
        return grpc.StatusCode.UNAVAILABLE, shorten(str(store_unavailable(exc)), MAX_MESSAGE)
    log.exception("internal error", error=repr(exc))
    return grpc.StatusCode.INTERNAL, "internal error (see controller log)"


def grpc_errors(fn: Callable) -> Callable:
    """Turn domain exceptions raised by an RPC handler into gRPC statuses."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the one place errors become statuses
                code, msg = _status_for(exc)
                await context.abort(code, msg, trailing_metadata=_trailers(exc, code))

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the one place errors become statuses
            code, msg = _status_for(exc)
            await context.abort(code, msg, trailing_metadata=_trailers(exc, code))

    return unary
