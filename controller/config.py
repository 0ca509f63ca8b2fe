"""The controller's one typed configuration object."""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.controller.scheduler import DEFAULT_POLICY, POLICIES
from tether.sdk.constants import DEFAULT_CONTROLLER

__all__ = ["ControllerConfig"]


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a controller process is configured with.

    Built once from flags and ``TETHER_*`` environment variables (see ``tether controller
    --help``); never changed afterwards.

    Attributes:
        etcd_endpoints: ``host:port`` of etcd members.
        prefix: Key prefix under which every Tether record lives; several meshes can share
            one etcd with different prefixes.
        listen: ``host:port`` the gRPC server binds; port 0 picks a free port.
        lease_ttl: Seconds a node stays registered without heartbeats (an etcd lease TTL).
        heartbeat_interval: Seconds between agent heartbeats; defaults to a third of the TTL.
        cancel_grace: Seconds between SIGTERM and SIGKILL when an attempt is cancelled.
        retry_initial: Default first retry delay, seconds.
        retry_factor: Default multiplier of the retry delay.
        retry_max: Default cap of the retry delay, seconds.
        retry_jitter: Default fraction of each delay that is randomised.
        max_message_bytes: Largest gRPC message accepted or sent.
        metrics_listen: ``host:port`` for Prometheus metrics at ``/metrics`` over HTTP; empty
            serves none; port 0 picks a free port.
        retention: Seconds a finished run is kept in etcd before it is deleted, with its
            tasks and request id; 0 keeps runs forever.
        policy: Name of the placement policy (a key of
            :data:`tether.controller.scheduler.POLICIES`).
        auth: Check bearer tokens even without TLS (with TLS they are always checked; see
            :func:`tether.controller.auth.auth_required`).
        rate_limit: Requests a second each token may make on average; 0 is unlimited.
        rate_burst: Requests a token may make at once before the rate applies.
    """

    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/tether"
    listen: str = DEFAULT_CONTROLLER
    lease_ttl: int = 10
    heartbeat_interval: float = 0.0
    cancel_grace: float = 10.0
    retry_initial: float = 1.0
    retry_factor: float = 2.0
    retry_max: float = 60.0
    retry_jitter: float = 0.2
    max_message_bytes: int = 64 * 1024 * 1024
    metrics_listen: str = ""
    retention: float = 0.0
    policy: str = DEFAULT_POLICY
    service_name: str = field(default="tether-controller")
    auth: bool = False
    rate_limit: float = 50.0
    rate_burst: int = 200

    def __post_init__(self) -> None:
        if not self.etcd_endpoints:
            raise ValueError("etcd_endpoints: at least one endpoint is needed")
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix: must start and not end with '/', got {self.prefix!r}")
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl: must be >= 1 second")
        if self.heartbeat_interval < 0 or self.heartbeat_interval >= self.lease_ttl:
            raise ValueError("heartbeat_interval: must be in [0, lease_ttl)")
        if self.retention < 0:
            raise ValueError("retention: must be >= 0")
        if self.policy not in POLICIES:
            known = ", ".join(sorted(POLICIES))
            raise ValueError(f"policy: unknown {self.policy!r}; known: {known}")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("rate_limit: must be >= 0, and rate_burst >= 1")
        if self.heartbeat_interval == 0:
            object.__setattr__(self, "heartbeat_interval", self.lease_ttl / 3)
