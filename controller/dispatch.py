"""Messages to agents: the one place that builds assignments, cancellations and acks.

Each is sent only after the change it reflects is committed to etcd (the callers arrange
that), so an agent never runs or stops something a restarted controller would not know of.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from google.protobuf import duration_pb2
from opentelemetry import trace

from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller import gangs
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.config import ControllerConfig
from tether.controller.records import AgentSession, RunEntry, TaskEntry
from tether.controller.secrets import Secrets, SecretUnavailable
from tether.sdk.telemetry import context_from_traceparent, exports_spans, traceparent_of
from tether.sdk.templating import TemplateError, render_spec

__all__ = ["Dispatch", "render"]


def render(run: RunEntry, spec: t.TaskSpec) -> t.TaskSpec | None:
    """The spec with templates filled in from params and upstream outputs (None: none).

    Raises:
        TemplateError: a template does not render.
    """

    def output_of(name: str):
        raw = run.tasks[name].msg.outputs_json if name in run.tasks else ""
        return json.loads(raw) if raw else None

    return render_spec(spec, run.msg.params, output_of)


class Dispatch:
    """Sends assignments, cancellations and acknowledgements to connected agents."""

    def __init__(
        self,
        config: ControllerConfig,
        cache: Cache,
        tracer: trace.Tracer,
        secrets: Secrets | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.tracer = tracer
        # Its per-attempt spans are leaves nothing reads but a trace viewer: made only when
        # spans are exported (they cost a tenth of the controller's CPU per task).
        self.spans = exports_spans()
        self.secrets = secrets
        # Fails an attempt that cannot be sent (its secret is gone); set by the engine.
        self.unstartable: Callable[[AgentSession, agent_pb2.AttemptRef, str], None] = lambda *_: (
            None
        )

    def assign(self, run: RunEntry, e: TaskEntry, only: str = "") -> None:
        """Send the task's current attempt to its node (each replica's node, for a gang;
        ``only``: to that node alone), where the node's agent is connected."""
        m = e.msg
        if m.state not in lc.TASK_ACTIVE:
            return
        if not m.replicas:
            if not only or only == m.node:
                self._assign_to(
                    run, e, m.node, list(m.attempts[-1].gpu_indices) if m.attempts else []
                )
            return
        for r in m.replicas:
            if r.state == lc.SCHEDULED and (not only or only == r.node):
                self._assign_to(run, e, r.node, list(r.gpu_indices), gangs.gang_env(m, r))

    def _assign_to(
        self,
        run: RunEntry,
        e: TaskEntry,
        node_name: str,
        gpus: list[int],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        m = e.msg
        node = self.cache.nodes.get(node_name)
        if node is None or node.session is None:
            return  # sent again when the node registers; lost if it never does
        upstream = {d: run.tasks[d].msg.outputs_json for d in m.spec.depends_on}
        span_cm = (
            self.tracer.start_as_current_span(
                f"dispatch {m.spec.name}",
                context=context_from_traceparent(m.traceparent),
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "tether.run_id": run.msg.id,
                    "tether.task": m.spec.name,
                    "tether.attempt": m.attempt,
                    "tether.node": node_name,
                },
            )
            if self.spans
            else contextlib.nullcontext()
        )
        with span_cm as span:
            try:
                # After a controller restart the rendered spec is rebuilt from etcd's state.
                spec = e.rendered or render(run, m.spec) or m.spec
            except TemplateError:
                spec = m.spec
            if extra_env:
                copy = t.TaskSpec()
                copy.CopyFrom(spec)
                copy.env.update(extra_env)
                spec = copy
            ref = agent_pb2.AttemptRef(run_id=run.msg.id, task=m.spec.name, attempt=m.attempt)
            try:
                secret_env = self.secrets.resolve(m.spec) if self.secrets else {}
            except SecretUnavailable as err:
                self.unstartable(node.session, ref, str(err))
                return
            node.session.send(
                agent_pb2.ControllerMessage(
                    assign=agent_pb2.AssignTask(
                        ref=ref,
                        spec=spec,
                        upstream_outputs=upstream,
                        gpu_indices=gpus,
                        # Not exporting: the agent's spans hang off the run's span.
                        traceparent=traceparent_of(span) if span else m.traceparent,
                        params=run.msg.params,
                        secret_env=secret_env,
                    )
                )
            )
            if m.cancel_requested:  # cancelled between the bind and its commit
                self.cancel(node.session, run.msg.id, m.spec.name, m.attempt, "cancelled")

    def cancel_everywhere(self, e: TaskEntry, reason: str, but: str = "") -> None:
        """Tell every connected node running the current attempt (or a replica of it) to
        stop it; ``but``: except that node."""
        m = e.msg
        for name, _ in gangs.placements(m):
            node = self.cache.nodes.get(name)
            if name != but and node is not None and node.session is not None:
                self.cancel(node.session, m.run_id, m.spec.name, m.attempt, reason)

    def cancel(
        self,
        session: AgentSession,
        run_id: str,
        task: str,
        attempt: int,
        reason: str,
        requeue: bool = False,
    ) -> None:
        """Tell an agent to stop an attempt (SIGTERM, then SIGKILL after the grace);
        ``requeue``: for the node's sake, so it is retried elsewhere free of charge."""
        grace = duration_pb2.Duration()
        grace.FromNanoseconds(int(self.config.cancel_grace * 1e9))
        session.send(
            agent_pb2.ControllerMessage(
                cancel=agent_pb2.CancelTask(
                    ref=agent_pb2.AttemptRef(run_id=run_id, task=task, attempt=attempt),
                    reason=reason,
                    grace=grace,
                    requeue=requeue,
                )
            )
        )

    def ack(self, session: AgentSession, ref: agent_pb2.AttemptRef) -> None:
        """Tell an agent its final report is recorded, so it can forget it."""
        session.send(agent_pb2.ControllerMessage(ack=agent_pb2.StatusAck(ref=ref)))

    def acker(self, session: AgentSession, ref: agent_pb2.AttemptRef) -> Callable[[], None]:
        """A callback that acknowledges ``ref`` later (a copy: the report may be reused)."""
        r = agent_pb2.AttemptRef()
        r.CopyFrom(ref)
        return lambda: self.ack(session, r)
