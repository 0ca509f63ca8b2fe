"""Prometheus metrics of a controller: what it runs, how fast it schedules, how its nodes are.

Counters and the histogram are updated on the engine's loop as things happen; the gauges are a
snapshot the loop refreshes every second, which the HTTP thread only reads. Each controller has
its own registry, so several can live in one process (tests, ``tether dev``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tether.controller import lifecycle as lc

if TYPE_CHECKING:
    from tether.controller.engine import Engine

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
        self.schedule_latency = Histogram(
            "tether_schedule_latency_seconds",
            "Time from READY to bound to a node.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._snapshot: list[GaugeMetricFamily] = []
        self.registry.register(_Snapshot(self))
        self._http = None

    def refresh(self, engine: Engine | None, leader: bool) -> None:
        """Recompute the gauges from the engine (call on the engine's loop)."""
        families = []
        g = GaugeMetricFamily("tether_leader", "1 if this controller leads.")
        g.add_metric([], 1.0 if leader else 0.0)
        families.append(g)
        if engine is not None:
            by_state: dict[str, int] = {}
            for run in engine.runs.values():
                for e in run.tasks.values():
                    name = lc.task_state_name(e.msg.state)
                    by_state[name] = by_state.get(name, 0) + 1
            tasks = GaugeMetricFamily(
                "tether_tasks", "Tasks of unfinished runs, by state.", labels=["state"]
            )
            for name, n in sorted(by_state.items()):
                tasks.add_metric([name], n)
            runs = GaugeMetricFamily("tether_runs_active", "Runs not finished yet.")
            runs.add_metric([], len(engine.runs))
            ready = GaugeMetricFamily("tether_ready_queue", "READY tasks waiting for a node.")
            ready.add_metric([], len(engine.ready))
            families += [tasks, runs, ready]
            node_families = {
                name: GaugeMetricFamily(name, doc, labels=["node"])
                for name, doc in (
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
            }
            now = time.monotonic()
            for node in engine.nodes.values():
                values = {
                    "tether_node_connected": 1.0 if node.session is not None else 0.0,
                    "tether_node_cpu_capacity": node.capacity.cpu,
                    "tether_node_cpu_allocated": node.cpu_used,
                    "tether_node_memory_capacity_bytes": node.capacity.memory_bytes,
                    "tether_node_memory_allocated_bytes": node.memory_used,
                    "tether_node_gpus": len(node.gpu_indices),
                    "tether_node_gpus_allocated": len(node.gpus_used),
                    "tether_node_running_attempts": len(node.attempts),
                }
                if node.last_heartbeat:
                    values["tether_node_heartbeat_age_seconds"] = now - node.last_heartbeat
                for name, value in values.items():
                    node_families[name].add_metric([node.name], value)
            families += list(node_families.values())
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
