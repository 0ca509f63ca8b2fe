"""Typed errors of the Tether SDK, one per gRPC status a user can act on.

``from_rpc_error`` is the one place where a ``grpc.RpcError`` becomes a Tether exception;
nothing matches on message text.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = [
    "ERROR_REASON_KEY",
    "LEADER_KEY",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidSpecError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "TetherError",
    "TimeoutError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "leader_of",
    "shorten",
    "summarize",
]


# Trailing metadata the controller puts on every status it returns itself: a short reason a
# client can act on where the code alone does not say enough ("not_leader": ask another
# controller; "node_unavailable": another controller will not help), else the code's name in
# lower case ("not_found"). Absent when gRPC could not reach the controller at all.
ERROR_REASON_KEY = "tether-error-reason"

# Trailing metadata a standby controller adds to its refusals: the address the leader
# advertises, so that clients and agents go straight there.
LEADER_KEY = "tether-leader"


@dataclass(frozen=True)
class FieldViolation:
    """One problem in a spec or request: where it is and what is wrong."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}" if self.field else self.description


# Problems are listed the same way wherever they are found, in the SDK before a spec is sent
# and in the controller's refusals. A refusal travels in a header, and gRPC refuses headers
# over 16 KiB (the client then sees RESOURCE_EXHAUSTED, not our status); a local error is one
# line a user reads. Both echo what was sent, which can be a megabyte: list a few problems,
# each cut short, and cap the whole.
MAX_LISTED = 20
MAX_PART = 240
MAX_MESSAGE = 4096


def shorten(text: str, limit: int) -> str:
    """``text`` with its middle elided to at most ``limit`` characters (both ends say most:
    a field path ends with the field's name)."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def summarize(violations: Sequence[FieldViolation]) -> str:
    """At most ``MAX_LISTED`` problems, each part at most ``MAX_PART`` characters, and how
    many more there are; the whole at most ``MAX_MESSAGE`` characters."""
    shown = violations[:MAX_LISTED]
    parts = [
        str(FieldViolation(shorten(v.field, MAX_PART), shorten(v.description, MAX_PART)))
        for v in shown
    ]
    if len(violations) > len(shown):
        parts.append(f"and {len(violations) - len(shown)} more problems")
    return shorten("; ".join(parts), MAX_MESSAGE)


class TetherError(Exception):
    """Base of every SDK error. ``code`` is the gRPC status code, when one applies.

    ``reason`` says why, as the controller put it (for example ``"node_unavailable"`` or
    ``"not_leader"``); it is empty when the controller was not reached.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidSpecError(TetherError):
    """The request or workflow spec is invalid (``INVALID_ARGUMENT``).

    ``violations`` holds every problem in full; the message lists a few, cut short (see
    :func:`summarize`).
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation] | str) -> None:
        if isinstance(violations, str):
            # One text (a controller's refusal, summarized there already): only its length
            # is capped.
            self.violations = [FieldViolation("", violations)]
            super().__init__(shorten(violations, MAX_MESSAGE))
            return
        self.violations = list(violations)
        super().__init__(summarize(self.violations))


class NotFoundError(TetherError):
    """The run, task or node does not exist (``NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TetherError):
    """The object already exists (``ALREADY_EXISTS``)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(TetherError):
    """The object is in a state that forbids the request (``FAILED_PRECONDITION``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(TetherError):
    """The controller cannot be reached or cannot reach etcd, or the node a request needs is
    not connected (``reason`` ``"node_unavailable"``) (``UNAVAILABLE``); retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class TimeoutError(TetherError, builtins.TimeoutError):
    """A deadline passed before the operation finished (``DEADLINE_EXCEEDED``).

    Also the built-in :class:`TimeoutError` (so an ``OSError`` too): ``except TimeoutError``
    catches it whether or not the name was imported from the SDK.
    """

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(TetherError):
    """The call has no valid token: missing, unknown, revoked or expired
    (``UNAUTHENTICATED``). Pass ``token=`` or set ``TETHER_TOKEN``."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(TetherError):
    """The token's role may not make the call; the message names the role needed
    (``PERMISSION_DENIED``)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimitedError(TetherError):
    """A limit was reached (``RESOURCE_EXHAUSTED``). ``retry_after`` is the number of seconds
    to wait when the controller said (a token's request rate), else None."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after: float | None = None


_BY_CODE: dict[grpc.StatusCode, type[TetherError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
}


def from_rpc_error(err: grpc.RpcError) -> TetherError:
    """Turn a gRPC error into the matching Tether exception, keeping code and details."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    reason = _reason_of(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        exc: TetherError = InvalidSpecError(details)
    else:
        if code == grpc.StatusCode.UNAVAILABLE and not reason:
            details = f"controller unavailable: {details}"
        exc = _BY_CODE.get(code, TetherError)(details, code)
    if isinstance(exc, RateLimitedError):
        exc.retry_after = _retry_after(err)
    exc.reason = reason
    return exc


def _retry_after(err: grpc.RpcError) -> float | None:
    """The delay of a google.rpc.RetryInfo in the status details, if the status has one."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(err)
    except (AttributeError, ValueError):  # no call behind the error, or mismatched details
        return None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _trailer(err: grpc.RpcError, key: str) -> str:
    trailing = getattr(err, "trailing_metadata", None)  # absent on a bare RpcError
    metadata = (trailing() if callable(trailing) else None) or ()
    return next((v for k, v in metadata if k == key), "")


def _reason_of(err: grpc.RpcError) -> str:
    """The controller's reason for the status; empty when gRPC failed to reach it."""
    return _trailer(err, ERROR_REASON_KEY)


def leader_of(err: grpc.RpcError) -> str:
    """The leader's address a standby controller named in its refusal; empty if none."""
    return _trailer(err, LEADER_KEY)
