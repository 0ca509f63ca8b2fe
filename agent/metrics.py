"""Prometheus metrics of an agent, served at ``/metrics`` when ``metrics_listen`` is set.

Each agent has its own registry, so several can live in one process (tests). The running
gauge is read at scrape time from the runner; the rest is counted as attempts start and end
and as heartbeats come back.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["AgentMetrics"]

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
_START_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class AgentMetrics:
    """An agent's metrics and, once :meth:`serve` is called, their HTTP endpoint.

    Args:
        node: This node's name, a label of every metric (one registry may be scraped
            through a proxy that merges nodes).
        runtime: The runtime's name, a label of the start latency and runtime errors.
    """

    def __init__(self, node: str, runtime: str) -> None:
        self.registry = CollectorRegistry()
        self.node = node
        self.runtime = runtime
        # Label children of the per-attempt metrics, looked up once.
        self._by_outcome: dict[str, tuple] = {}
        self._start_latency = None
        self.running = Gauge(
            "tether_agent_attempts_running",
            "Attempts this agent runs now (started or adopted, not finished).",
            ["node"],
            registry=self.registry,
        )
        self.finished = Counter(
            "tether_agent_attempts_finished",
            "Attempts that ended on this node, by outcome (succeeded, failed, cancelled, "
            "timeout, runtime_error, fenced, drained, ...).",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tether_agent_attempt_duration_seconds",
            "Time from an attempt's start to its end on this node, by outcome.",
            ["node", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.start_latency = Histogram(
            "tether_agent_start_duration_seconds",
            "Time the runtime took to start an attempt (for containers: pull, create, start).",
            ["node", "runtime"],
            buckets=_START_BUCKETS,
            registry=self.registry,
        )
        self.runtime_errors = Counter(
            "tether_agent_runtime_errors",
            "Attempts the runtime could not start or run (engine errors, missing images), "
            "by reason.",
            ["node", "runtime", "reason"],
            registry=self.registry,
        )
        self.heartbeat_rtt = Histogram(
            "tether_agent_heartbeat_rtt_seconds",
            "Time from sending a heartbeat to its acknowledgement (the node's lease renewed).",
            ["node"],
            buckets=_RTT_BUCKETS,
            registry=self.registry,
        )
        self._http = None

    def count_running(self, count: Callable[[], int]) -> None:
        """Read the running gauge from ``count()`` at each scrape."""
        self.running.labels(self.node).set_function(count)

    def attempt_finished(self, outcome: str, seconds: float | None) -> None:
        """An attempt ended with ``outcome`` after ``seconds`` (None: it never started)."""
        children = self._by_outcome.get(outcome)
        if children is None:  # a labels() look-up per attempt costs more than the count
            children = self._by_outcome[outcome] = (
                self.finished.labels(self.node, outcome),
                self.duration.labels(self.node, outcome),
            )
        children[0].inc()
        if seconds is not None:
            children[1].observe(max(seconds, 0.0))

    def started(self, seconds: float) -> None:
        """The runtime started an attempt in ``seconds``."""
        if self._start_latency is None:
            self._start_latency = self.start_latency.labels(self.node, self.runtime)
        self._start_latency.observe(seconds)

    def runtime_error(self, reason: str) -> None:
        """The runtime failed an attempt with ``reason`` (``runtime_error``, ``image``, ...)."""
        self.runtime_errors.labels(self.node, self.runtime, reason or "runtime_error").inc()

    def heartbeat_acked(self, seconds: float) -> None:
        """A heartbeat came back acknowledged after ``seconds``."""
        self.heartbeat_rtt.labels(self.node).observe(seconds)

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0 picks one); return the port."""
        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"metrics_listen: {listen!r} is not HOST:PORT")
        try:
            self._http, _ = start_http_server(
                int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry
            )
        except OSError as e:
            raise OSError(f"metrics_listen: cannot listen on {listen}: {e.strerror}") from None
        return self._http.server_port

    def close(self) -> None:
        """Stop serving. Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
