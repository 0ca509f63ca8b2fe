"""The controller's one typed configuration object."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from tether.controller.etcd_connection import EtcdConnection
from tether.controller.policies import DEFAULT_POLICY, POLICIES
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.validation import Limits

__all__ = ["ControllerConfig", "advertised", "is_loopback"]


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` listen address is reachable only from this host."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or empty/0.0.0.0-like wildcards: reachable from others
        return False


def advertised(listen: str, port: int) -> str:
    """The ``host:port`` a controller listening on ``listen`` (bound to ``port``) is reached
    at: a wildcard host becomes this host's name."""
    host = listen.rpartition(":")[0]
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = socket.getfqdn() or socket.gethostname()
    return f"{host}:{port}"


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a controller process is configured with.

    Built once from flags and ``TETHER_*`` environment variables (see ``tether controller
    --help``); never changed afterwards.

    Attributes:
        etcd_endpoints: etcd members as etcdctl takes them: ``host:port``, ``http://h:p`` or
            ``https://h:p`` (see :mod:`tether.controller.etcd_connection`).
        etcd_ca: PEM CA file that signed etcd's certificates (TLS to etcd).
        etcd_cert: PEM client certificate for etcd (with ``etcd_key``).
        etcd_key: PEM key of ``etcd_cert``.
        etcd_user: etcd user (etcd auth); its password is read from ``etcd_password_file``.
        etcd_password_file: File holding ``etcd_user``'s password.
        limits: Sizes and counts a request may not exceed (refused with INVALID_ARGUMENT
            naming the field and the limit).
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
        policy: Name of the placement policy for workflows that name none (a key of
            :data:`tether.controller.policies.POLICIES`).
        priority_aging: Seconds of waiting that add one point to a ready task's priority
            (so low priorities are never starved forever); 0 turns aging off.
        tls_cert: PEM file of the controller's server certificate; empty serves plaintext.
        tls_key: PEM file of that certificate's key.
        tls_ca: PEM file of the CA whose node certificates agents must present; empty
            accepts agents without checking their node (only the node-id rule applies).
        insecure: Allow plaintext on a non-loopback listen address.
        secrets_key_file: File with the 32-byte AES key (raw or base64) that encrypts
            secrets in etcd; empty turns secrets off (their RPCs answer FAILED_PRECONDITION).
        auth: Check bearer tokens even without TLS (with TLS they are always checked; see
            :func:`tether.controller.auth.auth_required`).
        rate_limit: Requests a second each token may make on average; 0 is unlimited.
        rate_burst: Requests a token may make at once before the rate applies.
        advertise: ``host:port`` where clients and agents reach this controller, written
            in the leader key so that standbys can send callers to the leader; empty
            derives it from ``listen`` (this host's name for a wildcard host, the bound port
            for port 0).
        leader_ttl: Seconds the leader's etcd lease lives without renewal: how long a dead
            leader keeps a standby from taking over, and how long a leader that cannot reach
            etcd keeps acting before it steps down.
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
    priority_aging: float = 30.0
    secrets_key_file: str = ""
    service_name: str = field(default="tether-controller")
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    insecure: bool = False
    advertise: str = ""
    leader_ttl: int = 3

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return bool(self.tls_cert)

    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password_file: str = ""
    limits: Limits = field(default_factory=Limits)
    auth: bool = False
    rate_limit: float = 50.0
    rate_burst: int = 200

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert, tls_key: give both the certificate and its key")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca: checking node certificates needs TLS (tls_cert, tls_key)")
        if not self.tls and not self.insecure and not is_loopback(self.listen):
            raise ValueError(
                f"listen: {self.listen} is reachable from other hosts, and plaintext would let "
                "anyone on the network run commands on every node; serve TLS (--tls-cert, "
                "--tls-key, --tls-ca) or pass --insecure"
            )
        if not self.etcd_endpoints:
            raise ValueError("etcd_endpoints: at least one endpoint is needed")
        EtcdConnection.from_config(self)  # raises ValueError naming what is wrong
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix: must start and not end with '/', got {self.prefix!r}")
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl: must be >= 1 second")
        if self.leader_ttl < 2:
            # etcd's own floor is about 1.5 s (it rounds shorter leases up).
            raise ValueError("leader_ttl: must be >= 2 seconds")
        if self.advertise and not self.advertise.rpartition(":")[2].isdigit():
            raise ValueError(f"advertise: expected host:port, got {self.advertise!r}")
        if self.heartbeat_interval < 0 or self.heartbeat_interval >= self.lease_ttl:
            raise ValueError("heartbeat_interval: must be in [0, lease_ttl)")
        if self.retention < 0:
            raise ValueError("retention: must be >= 0")
        if self.priority_aging < 0:
            raise ValueError("priority_aging: must be >= 0")
        if self.policy not in POLICIES:
            known = ", ".join(sorted(POLICIES))
            raise ValueError(f"policy: unknown {self.policy!r}; known: {known}")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("rate_limit: must be >= 0, and rate_burst >= 1")
        if self.heartbeat_interval == 0:
            object.__setattr__(self, "heartbeat_interval", self.lease_ttl / 3)
