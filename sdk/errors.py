"""Typed errors of the Tether SDK, one per gRPC status a user can act on.

``from_rpc_error`` is the one place where a ``grpc.RpcError`` becomes a Tether exception;
nothing matches on message text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from tether.sdk.validation import FieldViolation

__all__ = [
    "STATUS_ORIGIN_KEY",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidSpecError",
    "NotFoundError",
    "TetherError",
    "UnavailableError",
    "from_rpc_error",
]


# Trailing metadata key the controller sets (to "controller") on every status it returns itself.
STATUS_ORIGIN_KEY = "tether-status-origin"


class TetherError(Exception):
    """Base of every SDK error. ``code`` is the gRPC status code, when one applies."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidSpecError(TetherError):
    """The request or workflow spec is invalid (``INVALID_ARGUMENT``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation] | str) -> None:
        if isinstance(violations, str):
            from tether.sdk.validation import FieldViolation

            violations = [FieldViolation("", violations)]
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


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
    """The controller cannot be reached or cannot reach etcd (``UNAVAILABLE``); retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class TimeoutError(TetherError):
    """A deadline passed before the operation finished (``DEADLINE_EXCEEDED``)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[TetherError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
}


def from_rpc_error(err: grpc.RpcError) -> TetherError:
    """Turn a gRPC error into the matching Tether exception, keeping code and details."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidSpecError(details)
    if code == grpc.StatusCode.UNAVAILABLE and not _from_controller(err):
        details = f"controller unavailable: {details}"
    cls = _BY_CODE.get(code, TetherError)
    return cls(details, code)


def _from_controller(err: grpc.RpcError) -> bool:
    """Whether the controller itself returned the status (rather than gRPC failing to reach it)."""
    trailing = getattr(err, "trailing_metadata", None)  # absent on a bare RpcError
    metadata = (trailing() if callable(trailing) else None) or ()
    return any(k == STATUS_ORIGIN_KEY and v == "controller" for k, v in metadata)
