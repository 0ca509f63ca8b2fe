"""A run's timeline from its own records, for ``tether trace RUN``.

Everything comes from the run as the controller stores it (``created_at``, each attempt's
``scheduled_at``, ``started_at`` and ``finished_at``), not from a tracing backend, so it
works without Jaeger and agrees with the run's span, which is recorded from the same times.

Each attempt's row has three parts: **wait** (from when it could start — the run's submit,
its last upstream task's end, or its previous attempt's end — until the scheduler bound it),
**start** (bound → the agent started it: dispatch, image pull, container start) and **run**
(started → ended). The **critical path** is the chain of tasks that decided when the run
ended: the task that ended last, the upstream task that ended last before it, and so on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from tether.api.v1 import types_pb2 as t
from tether.sdk.quantities import format_duration
from tether.sdk.states import run_state_name, task_state_name

__all__ = [
    "TRACE_URL_ENV",
    "AttemptBar",
    "Timeline",
    "render",
    "timeline",
    "trace_id_of",
    "trace_url",
]

# A link template to a trace viewer, e.g. ``http://jaeger:16686/trace/{trace_id}``.
TRACE_URL_ENV = "TETHER_TRACE_URL"


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id of a W3C ``traceparent``, or ``""``."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1].strip("0"):
        return parts[1]
    return ""


def trace_url(trace_id: str, template: str | None = None) -> str:
    """The trace's link from ``template`` (default ``$TETHER_TRACE_URL``), or ``""``."""
    template = os.environ.get(TRACE_URL_ENV, "") if template is None else template
    if not template or not trace_id:
        return ""
    return template.replace("{trace_id}", trace_id)


@dataclass(frozen=True)
class AttemptBar:
    """One attempt's times, in seconds from the run's submit (None: not reached)."""

    task: str
    attempt: int
    node: str
    state: str
    reason: str
    ready: float
    scheduled: float | None
    started: float | None
    finished: float | None
    critical: bool = False

    @property
    def wait(self) -> float | None:
        """Seconds from ready to bound to a node."""
        return None if self.scheduled is None else max(0.0, self.scheduled - self.ready)

    @property
    def start(self) -> float | None:
        """Seconds from bound to started on the node."""
        if self.scheduled is None or self.started is None:
            return None
        return max(0.0, self.started - self.scheduled)

    @property
    def run(self) -> float | None:
        """Seconds from started to ended."""
        if self.started is None or self.finished is None:
            return None
        return max(0.0, self.finished - self.started)


@dataclass(frozen=True)
class Timeline:
    """A run's timeline: its attempts in spec order, and the critical path's tasks."""

    run_id: str
    workflow: str
    state: str
    trace_id: str
    # Seconds from submit to the end (or to now, for an unfinished run).
    duration: float
    finished: bool
    # Seconds from submit to the first task bound to a node.
    queue_wait: float | None
    attempts: list[AttemptBar] = field(default_factory=list)
    critical_path: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain data (for ``--json``): every time in seconds from the run's submit."""
        out = asdict(self)
        for bar, raw in zip(self.attempts, out["attempts"], strict=True):
            raw.update(wait=bar.wait, start=bar.start, run=bar.run)
        return out


def _ns(ts) -> int:
    return ts.ToNanoseconds()


def timeline(run: t.Run, now_ns: int | None = None) -> Timeline:
    """Build the timeline of ``run`` (a ``GetRun`` reply, with its tasks)."""
    import time

    origin = _ns(run.created_at)
    finished = run.HasField("finished_at")
    end_ns = _ns(run.finished_at) if finished else (now_ns or time.time_ns())

    def rel(ts) -> float:
        return (_ns(ts) - origin) / 1e9

    tasks = sorted(run.tasks, key=lambda tk: tk.index)
    by_name = {tk.spec.name: tk for tk in tasks}

    def ended(tk: t.TaskRun) -> float | None:
        if tk.HasField("finished_at"):
            return rel(tk.finished_at)
        if tk.attempts and tk.attempts[-1].HasField("finished_at"):
            return rel(tk.attempts[-1].finished_at)
        return None

    critical = _critical_path(tasks, by_name, ended)
    bars: list[AttemptBar] = []
    for tk in tasks:
        upstream = [ended(by_name[d]) for d in tk.spec.depends_on if d in by_name]
        ready = max((u for u in upstream if u is not None), default=0.0)
        for att in tk.attempts:
            bar = AttemptBar(
                task=tk.spec.name,
                attempt=att.number,
                node=att.node,
                state=task_state_name(att.state),
                reason=att.reason,
                ready=ready,
                scheduled=rel(att.scheduled_at) if att.HasField("scheduled_at") else None,
                started=rel(att.started_at) if att.HasField("started_at") else None,
                finished=rel(att.finished_at) if att.HasField("finished_at") else None,
                critical=tk.spec.name in critical,
            )
            bars.append(bar)
            if bar.finished is not None:
                ready = bar.finished  # the next attempt waits from here (backoff included)
    starts = [b.scheduled for b in bars if b.scheduled is not None]
    return Timeline(
        run_id=run.id,
        workflow=run.workflow_name,
        state=run_state_name(run.state),
        trace_id=trace_id_of(run.traceparent),
        duration=max(0.0, (end_ns - origin) / 1e9),
        finished=finished,
        queue_wait=min(starts) if starts else None,
        attempts=bars,
        critical_path=critical,
    )


def _critical_path(tasks, by_name, ended) -> list[str]:
    """Task names from the first to the last of the chain that ended the run."""
    done = [(ended(tk), tk) for tk in tasks if ended(tk) is not None]
    if not done:
        return []
    _, tk = max(done, key=lambda pair: pair[0])
    path = [tk.spec.name]
    while True:
        ups = [(ended(by_name[d]), by_name[d]) for d in tk.spec.depends_on if d in by_name]
        ups = [(e, u) for e, u in ups if e is not None]
        if not ups:
            break
        _, tk = max(ups, key=lambda pair: pair[0])
        if tk.spec.name in path:  # a cycle cannot be stored, but never loop
            break
        path.append(tk.spec.name)
    return path[::-1]


_WAIT, _START, _RUN, _FAILED = "·", "░", "█", "▓"


def _bar(bar: AttemptBar, scale: float, width: int, now: float) -> str:
    cells = [" "] * width

    def paint(a: float | None, b: float | None, ch: str) -> None:
        if a is None:
            return
        b = now if b is None else b
        lo = min(width - 1, int(a * scale))
        hi = max(lo + 1, min(width, round(b * scale)))
        for i in range(lo, hi):
            cells[i] = ch

    run_ch = _RUN if bar.state in ("SUCCEEDED", "RUNNING", "SCHEDULED") else _FAILED
    paint(bar.ready, bar.scheduled, _WAIT)
    paint(bar.scheduled, bar.started if bar.started is not None else bar.finished, _START)
    paint(bar.started, bar.finished, run_ch)
    return "".join(cells)


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        ms = value * 1000
        return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"
    return format_duration(value)


def render(tl: Timeline, width: int = 100, trace_link: str = "") -> str:
    """The timeline as text: a header, then one row per attempt with its bar.

    Args:
        tl: The timeline.
        width: Characters available per line (the bars take what the columns leave).
        trace_link: A link to the trace to print under the header, if any.
    """
    head = f"run {tl.run_id} ({tl.workflow}) {tl.state}"
    head += f" in {_secs(tl.duration)}" if tl.finished else f", running for {_secs(tl.duration)}"
    lines = [head]
    if tl.trace_id:
        lines.append(f"trace {tl.trace_id}" + (f"  {trace_link}" if trace_link else ""))
    lines.append(f"queue wait {_secs(tl.queue_wait)} (submit → first task on a node)")
    if tl.critical_path:
        lines.append("critical path (*): " + " → ".join(tl.critical_path))
    names = [f"{'*' if b.critical else ' '} {b.task}#{b.attempt}" for b in tl.attempts]
    name_w = max([len(n) for n in names] + [6])
    node_w = max([len(b.node) for b in tl.attempts] + [4])
    fixed = name_w + node_w + 3 * 8 + 17 + 6
    bar_w = max(10, width - fixed)
    scale = bar_w / tl.duration if tl.duration > 0 else 0.0
    header = (
        f"{'task':<{name_w}} {'node':<{node_w}} {'wait':>7} {'start':>7} {'run':>7} "
        f"{'state':<16} |{'0s':<{bar_w - len(_secs(tl.duration))}}{_secs(tl.duration)}|"
    )
    lines.append(header)
    for name, b in zip(names, tl.attempts, strict=True):
        state = b.state.lower() if not b.reason else f"{b.state.lower()}:{b.reason}"
        lines.append(
            f"{name:<{name_w}} {b.node:<{node_w}} {_secs(b.wait):>7} {_secs(b.start):>7} "
            f"{_secs(b.run):>7} {state[:16]:<16} |{_bar(b, scale, bar_w, tl.duration)}|"
        )
    lines.append(
        f"{_WAIT} waiting for a node   {_START} starting   {_RUN} running   {_FAILED} failed"
    )
    return "\n".join(lines)
