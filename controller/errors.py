"""Domain errors of the controller and their one mapping to gRPC status codes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import grpc

from tether.sdk.errors import ERROR_REASON_KEY, InvalidSpecError
from tether.sdk.telemetry import get_logger

__all__ = [
    "AlreadyExists",
    "Conflict",
    "FailedPrecondition",
    "NodeUnavailable",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StoreUnavailable",
    "Unauthenticated",
    "grpc_errors",
    "status_for",
]

log = get_logger("controller.errors")


class NotFound(Exception):
    """The named run, task or node does not exist."""


class FailedPrecondition(Exception):
    """The object's state forbids the request."""


class Conflict(Exception):
    """An etcd compare failed: someone else changed the record first."""


class StoreUnavailable(Exception):
    """etcd cannot be reached."""


class NotLeader(Exception):
    """This controller is not (or no longer) the leader; another one serves."""


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
    return ((ERROR_REASON_KEY, reason),)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message an exception is answered with."""
    return _status_for(exc)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES.items():
        if isinstance(exc, cls):
            return code, str(exc)
    from etcd3aio import EtcdError

    if isinstance(exc, EtcdError | ConnectionError | OSError):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable: {exc}"
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
