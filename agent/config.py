"""The agent's one typed configuration object."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

from pydantic.dataclasses import dataclass

from tether.agent.runtimes import registry
from tether.sdk.address import check_address, split_addresses
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.settings import ByteSize, Duration, KeyValues, setting

__all__ = ["DEFAULT_LOG_LIMIT", "AgentConfig", "default_node_name"]

DEFAULT_LOG_LIMIT = 64 * 2**20


def default_node_name() -> str:
    """The host name, lowered and trimmed to what a node name allows."""
    name = "".join(c for c in socket.gethostname().lower() if c.isalnum() or c in ".-")
    return name.strip(".-")[:63] or "node"


def _default_work_dir() -> Path:
    return Path(tempfile.gettempdir()) / "tether-agent"


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent process is configured with; never changed once built.

    ``tether agent`` builds it with :func:`tether.sdk.settings.layered`: defaults, then
    ``--config FILE``, then ``TETHER_*`` environment variables, then flags. Each field's
    meaning is in its ``description`` (shown by ``--help`` and in the README's table).
    """

    controller: str = setting(
        DEFAULT_CONTROLLER,
        description="host:port of the controller (several, comma-separated, for HA).",
        flag="--controller",
    )
    node: str = setting(
        default_factory=default_node_name,
        shown_default="the certificate's node, else the host name",
        description="This node's name, unique in the mesh; with tls_cert it must be the "
        "certificate's node.",
        flag="--name",
        env="TETHER_NODE",
    )
    labels: KeyValues = setting(
        default_factory=dict,
        description="Free-form KEY=VALUE labels shown in 'tether nodes' and matched by "
        "selectors (a mapping in the file; the flag repeats).",
        flag="--label",
        multiple=True,
    )
    runtime: str = setting(
        registry.DEFAULT,
        description="How tasks run: process (subprocesses) or docker (Docker Engine API, "
        "Docker or Podman).",
        flag="--runtime",
        choices=tuple(registry.names()),
    )
    work_dir: Path = setting(
        default_factory=_default_work_dir,
        shown_default="$TMPDIR/tether-agent-NODE",
        description="Where attempt directories (outputs, logs) are kept.",
        flag="--work-dir",
    )
    work_retention: Duration = setting(
        0.0,
        description="How long a run's directory in work_dir (its attempts' outputs and logs) "
        "is kept after the last change in it, e.g. 7d; 0 keeps them forever. Runs with "
        "attempts running here or reports not yet acknowledged are never removed.",
        flag="--work-retention",
    )
    cpu: float = setting(0.0, description="CPU cores offered; 0 detects them.", flag="--cpu")
    memory_bytes: ByteSize = setting(
        0,
        description="Memory offered, e.g. 8Gi; 0 detects it.",
        flag="--memory",
        env="TETHER_MEMORY",
    )
    max_tasks: int = setting(
        0, description="Most attempts run at once; 0 is twice the CPU count.", flag="--max-tasks"
    )
    reconnect_initial: Duration = setting(
        0.2, description="First reconnect delay after the stream breaks, seconds."
    )
    reconnect_max: Duration = setting(10.0, description="Cap of the reconnect delay, seconds.")
    stop_grace: Duration = setting(
        5.0, description="SIGTERM-to-SIGKILL grace when the agent itself shuts down."
    )
    log_limit_bytes: ByteSize = setting(
        DEFAULT_LOG_LIMIT,
        description="Most bytes kept of each attempt's stdout and of its stderr on this node's "
        "disk, e.g. 1Gi; later output is discarded and a note says so at the end of the "
        "file. 0 keeps everything.",
        flag="--log-limit",
        env="TETHER_LOG_LIMIT",
    )
    fake_gpus: str = setting(
        default_factory=lambda: os.environ.get("TETHER_FAKE_GPUS", ""),
        shown_default="",
        description="Test only: GPUs to pretend this node has: 2 (two 16 GiB fake GPUs), or "
        "a model and memory per device, e.g. a100:40Gi,a100:40Gi (labels "
        "tether.io/gpu-model=a100, tether.io/gpu-memory=40Gi). Never set this in production.",
    )
    docker_host: str = setting(
        "",
        description="Docker Engine API socket for the docker runtime, e.g. "
        "unix:///run/podman/podman.sock; empty uses the default socket.",
        flag="--docker-host",
        env="DOCKER_HOST",
    )
    leave_running: bool = setting(
        False,
        description="On shutdown, leave running attempts (containers, or the process "
        "runtime's processes) for the next agent on this node to adopt instead of stopping "
        "them; the agent does not drain then.",
        flag="--leave-running",
    )
    service_name: str = setting(
        "tether-agent", description="OpenTelemetry service name of this process."
    )
    tls_cert: str = setting(
        "",
        description="PEM file of this node's certificate (tether certs issue node NAME); "
        "with it the agent proves its node to a controller that checks node certificates.",
        flag="--tls-cert",
    )
    tls_key: str = setting("", description="PEM key of tls_cert.", flag="--tls-key")
    tls_ca: str = setting(
        "",
        description="PEM CA the controller's certificate must chain to; with it (or with "
        "tls_cert) the agent connects over TLS.",
        flag="--tls-ca",
    )
    token: str = setting(
        "",
        description="Bearer token (role operator or admin) for a controller that checks "
        "tokens but not node certificates (--auth without --tls-ca); the agent sends it "
        "when it connects. Prefer the environment variable to the flag.",
        flag="--token",
        env="TETHER_AGENT_TOKEN",
    )
    disconnect_grace: Duration = setting(
        0.0,
        description="How long the agent keeps its attempts running without reaching a "
        "controller before it stops them itself (their copies may be starting elsewhere), "
        "e.g. 30s; 0 uses the node's lease TTL, which the controller gives at registration.",
        flag="--disconnect-grace",
    )
    report_linger: Duration = setting(
        0.002,
        description="How long a final report waits for others to join it in one message to "
        "the controller: on a busy node attempts end milliseconds apart, and a batch costs "
        "both ends less than its reports one by one. 0 sends each at once.",
        flag="--report-linger",
    )
    drain_grace: Duration = setting(
        20.0,
        description="On SIGTERM, how long running attempts may finish while the controller "
        "places nothing new on the node; then what remains is stopped (retried elsewhere "
        "free of charge) and the agent exits. 0 stops attempts at once. Not used with "
        "leave_running, whose attempts outlive the agent anyway.",
        flag="--drain-grace",
    )
    address: str = setting(
        "",
        shown_default="this host's name",
        description="Host name or address other nodes reach this one at (a gang's "
        "TETHER_MASTER_ADDR when replica 0 runs here).",
        flag="--address",
    )
    metrics_listen: str = setting(
        "",
        description="host:port where the agent serves Prometheus metrics at /metrics over "
        "HTTP; empty serves none; port 0 picks a free port.",
        flag="--metrics-listen",
    )

    def __post_init__(self) -> None:
        split_addresses(self.controller)  # a missing port is refused, not dialled as :443
        if self.disconnect_grace < 0:
            raise ValueError("disconnect_grace must not be negative")
        if self.drain_grace < 0:
            raise ValueError("drain_grace must not be negative")
        if not 0 <= self.report_linger <= 1:
            raise ValueError("report_linger must be between 0s and 1s")
        if self.metrics_listen:
            check_address(self.metrics_listen, "metrics_listen", any_port=True)
        if not self.address:
            object.__setattr__(self, "address", socket.gethostname())
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert, tls_key: give both the node certificate and its key")
        # Tasks run in their attempt directory and get file paths in their environment: a
        # relative work_dir would make those paths point nowhere.
        object.__setattr__(self, "work_dir", Path(self.work_dir).resolve())
        runtime = registry.get(self.runtime)  # raises ValueError for an unknown name
        if not math.isfinite(self.cpu):
            raise ValueError(f"cpu: must be a finite number of cores, got {self.cpu}")
        if self.cpu < 0 or self.memory_bytes < 0 or self.max_tasks < 0:
            raise ValueError("cpu, memory and max_tasks must not be negative")
        if self.log_limit_bytes < 0:
            raise ValueError("log_limit_bytes must not be negative")
        if self.work_retention < 0:
            raise ValueError("work_retention must not be negative")
        if self.leave_running and not runtime.recovers:
            recovering = " or ".join(registry.recovering_names())
            raise ValueError(
                f"leave_running needs the {recovering} runtime, the one that recovers work"
            )
        if self.reconnect_initial <= 0 or self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_initial must be > 0 and <= reconnect_max")
