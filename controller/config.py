"""The controller's one typed configuration object."""

from __future__ import annotations

import ipaddress
import socket

from pydantic.dataclasses import dataclass

from tether.controller.etcd_connection import EtcdConnection
from tether.controller.policies import DEFAULT_POLICY, POLICIES
from tether.sdk.address import check_address
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.settings import ByteSize, CommaList, Duration, setting
from tether.sdk.validation import Limits

__all__ = ["ControllerConfig", "advertised", "is_loopback"]

# The smallest max_message_bytes accepted: below it, ordinary requests and answers fail.
MIN_MESSAGE_BYTES = 64 * 1024


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
    """Everything a controller process is configured with; never changed once built.

    ``tether controller`` builds it with :func:`tether.sdk.settings.layered`: defaults, then
    ``--config FILE``, then ``TETHER_*`` environment variables, then flags. Each field's
    meaning is in its ``description`` (shown by ``--help`` and in the README's table).
    """

    etcd_endpoints: CommaList = setting(
        ("127.0.0.1:2379",),
        description="etcd members as etcdctl takes them: host:port, http://h:p or https://h:p "
        "(comma-separated in a flag or the environment).",
        flag="--etcd",
        env="TETHER_ETCD",
    )
    etcd_ca: str = setting(
        "", description="PEM CA that signed etcd's certificates (TLS to etcd).", flag="--etcd-ca"
    )
    etcd_cert: str = setting(
        "", description="PEM client certificate for etcd (with etcd_key).", flag="--etcd-cert"
    )
    etcd_key: str = setting("", description="PEM key of etcd_cert.", flag="--etcd-key")
    etcd_user: str = setting(
        "",
        description="etcd user, when etcd has auth enabled; its password is read from "
        "etcd_password_file.",
        flag="--etcd-user",
    )
    etcd_password_file: str = setting(
        "",
        description="File whose first line is etcd_user's password.",
        flag="--etcd-password-file",
    )
    etcd_wait: Duration = setting(
        15.0,
        description="How long a starting controller waits for etcd to answer before it exits "
        "with 'etcd not reachable', e.g. 15s.",
        flag="--etcd-wait",
    )
    prefix: str = setting(
        "/tether",
        description="Key prefix under which every Tether record lives; several meshes can "
        "share one etcd with different prefixes.",
        flag="--prefix",
    )
    listen: str = setting(
        DEFAULT_CONTROLLER,
        description="host:port the gRPC server binds; port 0 picks a free port.",
        flag="--listen",
    )
    advertise: str = setting(
        "",
        description="host:port where clients and agents reach this controller, written in "
        "the leader key so that standbys can send callers to the leader; empty derives it "
        "from listen (this host's name for 0.0.0.0, the bound port for port 0).",
        flag="--advertise",
    )
    lease_ttl: int = setting(
        10,
        description="Seconds a node stays registered without heartbeats (an etcd lease TTL).",
        flag="--lease-ttl",
    )
    heartbeat_interval: float = setting(
        0.0, description="Seconds between agent heartbeats; 0 is a third of lease_ttl."
    )
    leader_ttl: int = setting(
        3,
        description="Seconds the leader's etcd lease lives without renewal: how long a dead "
        "leader keeps a standby from taking over, and how long a leader that cannot reach "
        "etcd keeps acting before it steps down.",
        flag="--leader-ttl",
    )
    cancel_grace: Duration = setting(
        10.0,
        description="Seconds between SIGTERM and SIGKILL when an attempt is cancelled.",
        flag="--cancel-grace",
    )
    retry_initial: Duration = setting(1.0, description="Default first retry delay, seconds.")
    retry_factor: float = setting(2.0, description="Default multiplier of the retry delay.")
    retry_max: Duration = setting(60.0, description="Default cap of the retry delay, seconds.")
    retry_jitter: float = setting(
        0.2, description="Default fraction of each retry delay that is randomised."
    )
    retention: Duration = setting(
        0.0,
        description="How long a finished run is kept in etcd (with its tasks and request id) "
        "before it is deleted, e.g. 7d; 0 keeps runs forever.",
        flag="--retention",
    )
    pending_submit_ttl: Duration = setting(
        3600.0,
        description="How long the tasks of a large submit that died before its commit are "
        "kept in etcd for a retry with the same request id to finish it, counted from its "
        "first try; then they are deleted. Keep it well above the time a large submit takes "
        "(seconds). 0s keeps them forever.",
        flag="--pending-submit-ttl",
    )
    etcd_compaction_interval: Duration = setting(
        300.0,
        description="How often the leader compacts etcd's history, keeping the last interval "
        "of it (as kube-apiserver does); without compaction etcd's database grows until its "
        "quota stops all writes. 0s leaves it to etcd's own --auto-compaction-retention.",
        flag="--etcd-compaction-interval",
    )
    policy: str = setting(
        DEFAULT_POLICY,
        description="Placement policy for workflows that name none (scheduling.policy).",
        flag="--policy",
        choices=tuple(sorted(POLICIES)),
    )
    priority_aging: Duration = setting(
        30.0,
        description="A ready task gains one priority point per this much waiting, so low "
        "priorities are never starved, e.g. 30s; 0 turns aging off.",
        flag="--priority-aging",
    )
    schedule_window: int = setting(
        1024,
        description="READY tasks a scheduling pass orders at a time, oldest first: "
        "priorities, aging and policies order the tasks within a window, and the pass goes "
        "on to the next window only while a node has a free slot; up to a window of tasks "
        "of a higher priority than the lowest of the oldest join the first window, wherever "
        "they wait. It keeps a pass's cost bounded with 100,000 tasks ready. With few task "
        "slots free a window is smaller: 8 tasks per free slot, at least 64.",
        flag="--schedule-window",
    )
    metrics_listen: str = setting(
        "",
        description="host:port serving Prometheus metrics at /metrics over HTTP; empty "
        "serves none; port 0 picks a free port.",
        flag="--metrics-listen",
    )
    tls_cert: str = setting(
        "",
        description="PEM server certificate (from 'tether certs issue controller'); serves "
        "TLS. Empty serves plaintext.",
        flag="--tls-cert",
    )
    tls_key: str = setting("", description="PEM key of tls_cert.", flag="--tls-key")
    tls_ca: str = setting(
        "",
        description="PEM CA of the node certificates agents must present; empty accepts "
        "agents without checking their node (only the node-id rule applies), but where "
        "tokens are checked an agent then needs a token of role operator.",
        flag="--tls-ca",
    )
    insecure: bool = setting(
        False,
        description="Serve plaintext on a non-loopback address (anyone reaching it can run "
        "commands on every node).",
        flag="--insecure",
    )
    auth: bool = setting(
        False,
        description="Require bearer tokens without TLS too (with TLS they are always required).",
        flag="--auth",
    )
    rate_limit: float = setting(
        50.0,
        description="Requests a second each token may make on average; 0 is unlimited.",
        flag="--rate-limit",
    )
    rate_burst: int = setting(
        200,
        description="Requests a token may make at once before rate_limit applies.",
        flag="--rate-burst",
    )
    secrets_key_file: str = setting(
        "",
        description="File with the 32-byte AES key (raw or base64) that encrypts secrets in "
        "etcd; empty turns secrets off (their RPCs answer FAILED_PRECONDITION).",
        flag="--secrets-key-file",
    )
    max_message_bytes: ByteSize = setting(
        64 * 1024 * 1024,
        description="Largest gRPC message received or sent.",
        flag="--max-message-bytes",
    )
    submit_txn_bytes: ByteSize = setting(
        128 * 1024,
        description="Largest etcd transaction a submit writes tasks in: a bigger run is "
        "written in several, and becomes visible only with its last one.",
        flag="--submit-txn-bytes",
    )
    limits: Limits = setting(
        default_factory=Limits,
        description="Sizes and counts a request may not exceed (refused with "
        "INVALID_ARGUMENT naming the field and the limit).",
    )
    service_name: str = setting(
        "tether-controller", description="OpenTelemetry service name of this process."
    )

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return bool(self.tls_cert)

    def __post_init__(self) -> None:
        check_address(self.listen, "listen", any_port=True)
        if self.metrics_listen:
            check_address(self.metrics_listen, "metrics_listen", any_port=True)
        if self.priority_aging < 0:
            raise ValueError("priority_aging: must be >= 0")
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
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            # Smaller, and requests such as a run's status would not fit.
            raise ValueError(f"max_message_bytes: must be at least {MIN_MESSAGE_BYTES // 1024}Ki")
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl: must be >= 1 second")
        if self.etcd_wait <= 0:
            raise ValueError("etcd_wait: must be > 0")
        if self.leader_ttl < 2:
            # etcd's own floor is about 1.5 s (it rounds shorter leases up).
            raise ValueError("leader_ttl: must be >= 2 seconds")
        if self.advertise:
            check_address(self.advertise, "advertise")
        if self.heartbeat_interval < 0 or self.heartbeat_interval >= self.lease_ttl:
            raise ValueError("heartbeat_interval: must be in [0, lease_ttl)")
        if self.retention < 0:
            raise ValueError("retention: must be >= 0")
        if self.pending_submit_ttl < 0:
            raise ValueError("pending_submit_ttl: must be >= 0")
        if self.etcd_compaction_interval < 0:
            raise ValueError("etcd_compaction_interval: must be >= 0")
        if self.priority_aging < 0:
            raise ValueError("priority_aging: must be >= 0")
        if not 1024 <= self.submit_txn_bytes <= 1024 * 1024:
            raise ValueError("submit_txn_bytes: must be between 1KiB and 1MiB")
        if self.schedule_window < 1:
            raise ValueError("schedule_window: must be >= 1")
        if self.policy not in POLICIES:
            known = ", ".join(sorted(POLICIES))
            raise ValueError(f"policy: unknown {self.policy!r}; known: {known}")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("rate_limit: must be >= 0, and rate_burst >= 1")
        if self.heartbeat_interval == 0:
            object.__setattr__(self, "heartbeat_interval", self.lease_ttl / 3)
