"""Prometheus metrics of a controller: what it runs, how fast it schedules, how its nodes are,
how its gRPC services and its etcd calls fare.

Counters and histograms are updated as things happen: on the engine's loop (tasks, runs,
scheduling), by the gRPC interceptor (:mod:`tether.controller.grpc_metrics`) and by the
store around each etcd call. The gauges are built at scrape time from a
:class:`~tether.controller.cache.Snapshot` taken on the engine's loop (the HTTP thread asks
the loop for one and waits), so nothing is rebuilt while nobody scrapes. Each controller has
its own registry, so several can live in one process (tests, ``tether dev``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tether.controller.cache import Snapshot
from tether.sdk.telemetry import get_logger

__all__ = ["LATENCY_BUCKETS", "Metrics", "serve_registry"]

log = get_logger("controller.metrics")

# Seconds: from a fast etcd read to a slow scheduling decision.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400)
# How long a scrape waits for the engine's loop to take a snapshot.
_SNAPSHOT_TIMEOUT = 2.0


def serve_registry(registry: CollectorRegistry, listen: str):
    """Serve ``registry`` at ``http://listen/metrics`` (port 0 picks one); return the server."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"metrics_listen: {listen!r} is not HOST:PORT")
    try:
        server, _ = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
        )
    except OSError as e:
        raise OSError(f"metrics_listen: cannot listen on {listen}: {e.strerror}") from None
    return server


class Metrics:
    """The controller's metrics and, once :meth:`serve` is called, their HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks_finished = Counter(
            "tether_tasks_finished",
            "Tasks that reached a final state, by state.",
            ["state"],
            registry=self.registry,
        )
        self.attempts_started = Counter(
            "tether_attempts_scheduled", "Attempts bound to a node.", registry=self.registry
        )
        self.attempts_lost = Counter(
            "tether_attempts_lost", "Attempts lost with their node.", registry=self.registry
        )
        self.attempts_preempted = Counter(
            "tether_attempts_preempted",
            "Attempts stopped for a task of higher priority.",
            registry=self.registry,
        )
        self.schedule_latency = Histogram(
            "tether_schedule_latency_seconds",
            "Time from READY to bound to a node.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.runs_finished = Counter(
            "tether_runs_finished",
            "Runs that reached a final state, by state (SUCCEEDED, FAILED, CANCELLED).",
            ["state"],
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "tether_run_duration_seconds",
            "Time from submit to a run's final state, by that state.",
            ["state"],
            buckets=_RUN_BUCKETS,
            registry=self.registry,
        )
        # Names and labels as go-grpc-prometheus has them, so existing dashboards work.
        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server, by method (started - handled: open streams).",
            ["grpc_service", "grpc_method", "grpc_type"],
            registry=self.registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its end on the server (a stream's whole life), "
            "by method and status code.",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.etcd_latency = Histogram(
            "tether_etcd_request_duration_seconds",
            "Time of each etcd request the controller makes, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.etcd_errors = Counter(
            "tether_etcd_request_errors",
            "etcd requests that failed (unreachable, no quorum, timeout, refused), by operation.",
            ["operation"],
            registry=self.registry,
        )
        # Set from the store (server.py): how close the controller comes to etcd's request cap.
        self.etcd_largest_request = Gauge(
            "tether_etcd_largest_request_bytes",
            "Largest etcd transaction this controller sent (keys and values), bytes.",
            registry=self.registry,
        )
        self._snapshot: Callable[[], Snapshot] = lambda: Snapshot(leader=False)
        self.registry.register(_Snapshot(self))
        self._http = None

    def observe_etcd(self, operation: str, seconds: float, failed: bool) -> None:
        """Record one etcd request (the store calls this around each of its calls)."""
        self.etcd_latency.labels(operation).observe(seconds)
        if failed:
            self.etcd_errors.labels(operation).inc()

    def follow(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Snapshot]) -> None:
        """Build the gauges at each scrape from ``snapshot()``, called on ``loop``."""

        async def take() -> Snapshot:
            return snapshot()

        def on_loop() -> Snapshot:
            if loop.is_closed():
                return Snapshot(leader=False)
            try:
                if asyncio.get_running_loop() is loop:  # a scrape from the loop itself
                    return snapshot()
            except RuntimeError:  # no loop in this thread: the HTTP server's
                pass
            future = asyncio.run_coroutine_threadsafe(take(), loop)
            try:
                return future.result(_SNAPSHOT_TIMEOUT)
            except Exception as e:  # a busy or stopped loop: report what is known
                future.cancel()
                log.warning("no snapshot for metrics", error=repr(e))
                return Snapshot(leader=False)

        self._snapshot = on_loop

    def families(self) -> list[GaugeMetricFamily]:
        """The gauges of this moment (called at scrape time, off the engine's loop)."""
        snapshot = self._snapshot()
        g = GaugeMetricFamily("tether_leader", "1 if this controller leads.")
        g.add_metric([], 1.0 if snapshot.leader else 0.0)
        families = [g]
        if snapshot.leader:
            families += _engine_families(snapshot)
        return families

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0 picks one); return the port."""
        self._http = serve_registry(self.registry, listen)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Snapshot(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._metrics.families()


_NODE_GAUGES = (
    ("tether_node_connected", "1 if the node's agent is connected."),
    ("tether_node_cpu_capacity", "CPU cores the node offers."),
    ("tether_node_cpu_allocated", "CPU cores held by attempts on the node."),
    ("tether_node_memory_capacity_bytes", "Memory the node offers."),
    ("tether_node_memory_allocated_bytes", "Memory held by attempts."),
    ("tether_node_gpus", "GPUs the node offers."),
    ("tether_node_gpus_allocated", "GPUs held by attempts."),
    ("tether_node_running_attempts", "Attempts bound to the node."),
    ("tether_node_heartbeat_age_seconds", "Seconds since the last heartbeat."),
)


def _engine_families(snap: Snapshot) -> list[GaugeMetricFamily]:
    tasks = GaugeMetricFamily(
        "tether_tasks", "Tasks of unfinished runs, by state.", labels=["state"]
    )
    for name, n in sorted(snap.tasks_by_state.items()):
        tasks.add_metric([name], n)
    runs = GaugeMetricFamily("tether_runs_active", "Runs not finished yet.")
    runs.add_metric([], snap.active_runs)
    ready = GaugeMetricFamily("tether_ready_queue", "READY tasks waiting for a node.")
    ready.add_metric([], snap.ready_queue)
    node_families = {
        name: GaugeMetricFamily(name, doc, labels=["node"]) for name, doc in _NODE_GAUGES
    }
    for node in snap.nodes:
        values = {
            "tether_node_connected": 1.0 if node.connected else 0.0,
            "tether_node_cpu_capacity": node.cpu_capacity,
            "tether_node_cpu_allocated": node.cpu_allocated,
            "tether_node_memory_capacity_bytes": node.memory_capacity,
            "tether_node_memory_allocated_bytes": node.memory_allocated,
            "tether_node_gpus": node.gpus,
            "tether_node_gpus_allocated": node.gpus_allocated,
            "tether_node_running_attempts": node.running_attempts,
        }
        if node.heartbeat_age is not None:
            values["tether_node_heartbeat_age_seconds"] = node.heartbeat_age
        for name, value in values.items():
            node_families[name].add_metric([node.name], value)
    return [tasks, runs, ready, *node_families.values()]
