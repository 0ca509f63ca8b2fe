"""The agent's one typed configuration object."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tether.agent.runtimes import registry
from tether.sdk.constants import DEFAULT_CONTROLLER

__all__ = ["DEFAULT_LOG_LIMIT", "AgentConfig", "default_node_name"]

DEFAULT_LOG_LIMIT = 64 * 2**20


def default_node_name() -> str:
    """The host name, lowered and trimmed to what a node name allows."""
    name = "".join(c for c in socket.gethostname().lower() if c.isalnum() or c in ".-")
    return name.strip(".-")[:63] or "node"


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent process is configured with (see ``tether agent --help``).

    Attributes:
        controller: ``host:port`` of the controller.
        node: This node's name, unique in the mesh.
        labels: Free-form ``key=value`` labels shown in ``tether nodes`` and matched by
            tasks' ``node_selector`` and ``affinity``; the agent adds
            ``tether.io/gpu-model`` and ``tether.io/gpu-memory`` for its GPUs.
        address: Host name or address other nodes reach this one at (a gang's
            ``TETHER_MASTER_ADDR`` when replica 0 runs here); empty: this host's name.
        runtime: A name in :mod:`tether.agent.runtimes.registry`: ``process``
            (subprocesses) or ``docker`` (Docker Engine API).
        work_dir: Where attempt directories (outputs, logs) are kept.
        cpu: CPU cores offered; 0 detects them.
        memory_bytes: Memory offered; 0 detects it.
        max_tasks: Most attempts run at once; 0 means twice the CPU count.
        reconnect_initial: First reconnect delay after the stream breaks, seconds.
        reconnect_max: Cap of the reconnect delay, seconds.
        stop_grace: SIGTERM-to-SIGKILL grace when the agent itself shuts down.
        log_limit_bytes: Most bytes kept of each attempt's stdout and of its stderr on this
            node's disk (64 MiB each by default); later output is discarded and a note says
            so at the end of the file. 0 keeps everything.
        fake_gpus: Test-only: GPUs to pretend this node has (``TETHER_FAKE_GPUS``), e.g.
            ``"2"`` or ``"A100:80Gi,A100:80Gi"``. Never set this in production.
        docker_host: Docker Engine API socket for the ``docker`` runtime, e.g.
            ``unix:///run/podman/podman.sock``; empty uses ``DOCKER_HOST`` or the default socket.
        leave_running: On shutdown, leave containers running for the next agent on this node
            to adopt instead of stopping them (``docker`` runtime).
        service_name: OpenTelemetry service name of this process.
        tls_cert: PEM file of this node's certificate (``tether certs issue node NAME``);
            with it the agent proves its node to a controller that checks node certificates.
        tls_key: PEM file of that certificate's key.
        tls_ca: PEM file of the CA the controller's certificate must chain to; with it (or
            with ``tls_cert``) the agent connects over TLS.
        disconnect_grace: Seconds the agent keeps its attempts running without reaching a
            controller before it stops them itself (their copies may be starting elsewhere);
            0 uses the node's lease TTL, which the controller gives at registration.
        drain_grace: On SIGTERM, seconds the agent lets running attempts finish while the
            controller places nothing new on the node; then it stops what remains (retried
            elsewhere free of charge) and exits. 0 stops attempts at once. Not used with
            ``leave_running``, whose attempts outlive the agent anyway.
    """

    controller: str = DEFAULT_CONTROLLER
    node: str = field(default_factory=default_node_name)
    labels: dict[str, str] = field(default_factory=dict)
    address: str = ""
    runtime: str = registry.DEFAULT
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "tether-agent")
    cpu: float = 0.0
    memory_bytes: int = 0
    max_tasks: int = 0
    reconnect_initial: float = 0.2
    reconnect_max: float = 10.0
    stop_grace: float = 5.0
    log_limit_bytes: int = DEFAULT_LOG_LIMIT
    fake_gpus: str = field(default_factory=lambda: os.environ.get("TETHER_FAKE_GPUS", ""))
    docker_host: str = ""
    leave_running: bool = False
    service_name: str = "tether-agent"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    disconnect_grace: float = 0.0
    drain_grace: float = 20.0

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", socket.gethostname())
        if self.disconnect_grace < 0:
            raise ValueError("disconnect_grace must not be negative")
        if self.drain_grace < 0:
            raise ValueError("drain_grace must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert, tls_key: give both the node certificate and its key")
        # Tasks run in their attempt directory and get file paths in their environment: a
        # relative work_dir would make those paths point nowhere.
        object.__setattr__(self, "work_dir", Path(self.work_dir).resolve())
        runtime = registry.get(self.runtime)  # raises ValueError for an unknown name
        if self.cpu < 0 or self.memory_bytes < 0 or self.max_tasks < 0:
            raise ValueError("cpu, memory and max_tasks must not be negative")
        if self.log_limit_bytes < 0:
            raise ValueError("log_limit_bytes must not be negative")
        if self.leave_running and not runtime.recovers:
            recovering = " or ".join(registry.recovering_names())
            raise ValueError(
                f"leave_running needs the {recovering} runtime, the one that recovers work"
            )
        if self.reconnect_initial <= 0 or self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_initial must be > 0 and <= reconnect_max")
