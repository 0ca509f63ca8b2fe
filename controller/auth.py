"""Who may call what: roles, the method→role table, the caller of a call, and rate buckets.

Pure logic with no I/O; tokens in etcd are :mod:`tether.controller.tokens`, and the check on
every call is :mod:`tether.controller.guard`.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass

__all__ = [
    "AGENT_ROLE",
    "AGENT_SERVICE",
    "MUTATING",
    "OPEN_METHODS",
    "Principal",
    "Role",
    "TokenBucket",
    "auth_required",
    "current_principal",
    "required_role",
]

_CONTROLLER = "/tether.v1.ControllerService/"


class Role(enum.IntEnum):
    """A user's role; each one may do everything the roles below it may."""

    VIEWER = 1
    SUBMITTER = 2
    OPERATOR = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Role:
        """The role called ``name``; ValueError naming the known ones otherwise."""
        try:
            return cls[name.upper()]
        except KeyError:
            known = ", ".join(r.label for r in cls)
            raise ValueError(f"unknown role {name!r}; known: {known}") from None


# The least role each method needs. Methods not listed need admin, so a new RPC is closed
# until someone decides otherwise.
_TABLE: dict[str, Role] = {
    **{
        _CONTROLLER + m: Role.VIEWER
        for m in ("GetRun", "ListRuns", "WatchRun", "StreamLogs", "ListNodes")
    },
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.VIEWER,
    _CONTROLLER + "SubmitWorkflow": Role.SUBMITTER,
    # A submitter may cancel only its own runs; the servicer checks whose run it is.
    _CONTROLLER + "CancelRun": Role.SUBMITTER,
    **{_CONTROLLER + m: Role.OPERATOR for m in ("CordonNode", "UncordonNode", "DrainNode")},
}

# Callable without a token: probes, the one-time bootstrap (there is no token yet), and the
# agents' stream, which node certificates authenticate instead (without a node CA, an agent
# carries a token of AGENT_ROLE: see Guard).
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        _CONTROLLER + "BootstrapAcl",
    }
)
AGENT_SERVICE = "/tether.v1.AgentService/"
OPEN_SERVICES = (AGENT_SERVICE,)
# The role an agent's token needs where no node certificates are checked: agents are sent
# the secrets their tasks use and report results that feed other tasks, so not anyone with
# network access may be one; operators already manage the nodes.
AGENT_ROLE = Role.OPERATOR

# Calls that change something: each writes one audit line.
MUTATING = frozenset(
    _CONTROLLER + m
    for m in (
        "SubmitWorkflow",
        "CancelRun",
        "BootstrapAcl",
        "CreateToken",
        "RevokeToken",
        "SetSecret",
        "DeleteSecret",
        "CordonNode",
        "UncordonNode",
        "DrainNode",
    )
)


def required_role(method: str) -> Role:
    """The least role that may call ``method`` (a full gRPC method name)."""
    if method.startswith(AGENT_SERVICE):
        return AGENT_ROLE
    return _TABLE.get(method, Role.ADMIN)


def is_open(method: str) -> bool:
    """Whether ``method`` is served without a token."""
    return method in OPEN_METHODS or method.startswith(OPEN_SERVICES)


def auth_required(config) -> bool:
    """Whether a controller with ``config`` checks tokens: asked for, or serving TLS."""
    return bool(config.auth or getattr(config, "tls_cert", ""))


@dataclass(frozen=True)
class Principal:
    """Who makes a call. ``authenticated`` is False when auth is off (everyone is admin)."""

    name: str
    role: Role
    authenticated: bool = True

    def may(self, role: Role) -> bool:
        return self.role >= role


ANONYMOUS = Principal("anonymous", Role.ADMIN, authenticated=False)

# Set by the guard for the duration of each call's handler.
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "tether_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """The caller of the call being handled (``ANONYMOUS`` when auth is off)."""
    return _current.get()


def set_principal(principal: Principal) -> contextvars.Token:
    return _current.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    # A stream handler's finally may run in another context (when the generator is closed);
    # there the value is gone with that context anyway.
    try:
        _current.reset(token)
    except ValueError:
        pass


class TokenBucket:
    """A token bucket: ``rate`` requests a second on average, bursts up to ``burst``.

    Times are passed in (seconds of a monotonic clock) so the bucket is pure.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> float:
        """Take one request's worth; return 0 when allowed, else seconds until it would be."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate
