"""Prometheus metrics of a controller: what it runs, how fast it schedules, how its nodes are.

Counters and the histogram are updated on the engine's loop as things happen; the gauges come
from a :class:`~tether.controller.cache.Snapshot` the loop takes every second, which the HTTP
thread only reads. Each controller has its own registry, so several can live in one process
(tests, ``tether dev``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tether.controller.cache import Snapshot

__all__ = ["Metrics"]


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
        self._snapshot: list[GaugeMetricFamily] = []
        self.registry.register(_Snapshot(self))
        self._http = None

    def refresh(self, snapshot: Snapshot) -> None:
        """Recompute the gauges from a snapshot of the engine (call on the engine's loop)."""
        families = []
        g = GaugeMetricFamily("tether_leader", "1 if this controller leads.")
        g.add_metric([], 1.0 if snapshot.leader else 0.0)
        families.append(g)
        if snapshot.leader:
            families += _engine_families(snapshot)
        self._snapshot = families  # one reference swap: the HTTP thread sees old or new

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0 picks one); return the port."""
        host, _, port = listen.rpartition(":")
        self._http, _ = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
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
        yield from self._metrics._snapshot


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
