"""Moving tasks along the graph and finishing runs: applies :mod:`tether.controller.dag`'s
decisions to the cache and hands each changed record to the committer.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator

from opentelemetry import trace

from tether.controller import dag
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache
from tether.controller.committer import Committer
from tether.controller.metrics import Metrics
from tether.controller.records import RunEntry, TaskEntry, now
from tether.controller.run_span import record_run_span
from tether.sdk.telemetry import exports_spans, get_logger

__all__ = ["Progress"]

log = get_logger("controller.engine")

# Most changes a cascade makes in one turn of the loop.
CASCADE_SLICE = 256


class Progress:
    """Readies, skips and finishes tasks, and finishes runs whose tasks are all done."""

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.cache = cache
        self.committer = committer
        self.metrics = metrics
        self.tracer = tracer or trace.get_tracer("tether.controller")
        # The run span is the root of the run's trace; with no exporter nothing reads it.
        self.spans = exports_spans()

    def advance(self, run: RunEntry, e: TaskEntry) -> None:
        """Count a PENDING task's unfinished upstream tasks; ready or skip it if it can be.

        Used when a run is (re)loaded; afterwards the count is kept up to date as upstream
        tasks finish, so a fan-in of thousands costs O(1) per finished task, not O(n).
        """
        if e.msg.state != lc.PENDING:
            return
        bad = dag.count_waiting(run, e)
        if bad is not None:
            e.msg.message = dag.skip_reason(run, bad)
            self.finish_task(run, e, lc.SKIPPED)
        elif e.waiting == 0:
            lc.move_task(e.msg, lc.READY)
            self._readied(run, e)

    def ready_again(self, run: RunEntry, e: TaskEntry) -> None:
        """A RETRYING or LOST task's delay is over: READY, at the end of the queue."""
        lc.move_task(e.msg, lc.READY)
        self._readied(run, e)

    def _readied(self, run: RunEntry, e: TaskEntry, write: bool = True) -> None:
        if write:
            self.committer.mark(e)
        self.cache.enqueue((run.msg.id, e.msg.spec.name))
        self.cache.kick()

    def finish_task(
        self,
        run: RunEntry,
        e: TaskEntry,
        state: int,
        ack: Callable[[], None] | None = None,
        already_moved: bool = False,
    ) -> None:
        """Finish a task in ``state`` (``ack`` runs once that is in etcd) and cascade.

        A cascade of more than :data:`CASCADE_SLICE` changes (the start of a wide fan-out)
        goes on in later turns of the loop: done at once it would hold the loop for seconds,
        past the leader's lease. Its READY dependents are not written to etcd then: a burst
        of 100,000 writes would hold up etcd's lease renewals, and READY need not be stored,
        since a controller that loads the run readies every PENDING task whose upstream tasks
        are done (their next write, when bound, compares the revision they were stored at)."""
        wide = len(e.children) > CASCADE_SLICE
        self._go_on(run, e, dag.cascade(run, e, state, already_moved), ack, not wide)

    def _go_on(
        self,
        run: RunEntry,
        e: TaskEntry,
        steps: Iterator[dag.Step],
        ack: Callable[[], None] | None,
        write_ready: bool = True,
    ) -> None:
        if self.cache.runs.get(run.msg.id, run) is not run:
            return  # reloaded from etcd meanwhile: the fresh copy is reconciled as a whole
        done = 0
        for step in itertools.islice(steps, CASCADE_SLICE):
            done += 1
            if step.ready:
                self._readied(run, step.entry, write_ready)
                continue
            m = step.entry.msg
            self.cache.ready_since.pop((run.msg.id, m.spec.name), None)
            self.metrics.tasks_finished.labels(lc.task_state_name(m.state)).inc()
            self.committer.mark(step.entry, ack if step.entry is e else None)
        if done < CASCADE_SLICE:
            self.finish_run_if_done(run)
        else:
            asyncio.get_running_loop().call_soon(self._go_on, run, e, steps, None, write_ready)

    def finish_run_if_done(self, run: RunEntry) -> None:
        """Give a run whose tasks have all finished its final state."""
        outcome = dag.run_outcome(run)
        if outcome is None:
            return
        final, run.msg.message = outcome
        lc.move_run(run.msg, final)
        run.msg.finished_at.CopyFrom(now())
        # Once the final state is in etcd the run leaves memory: reads of finished runs go to
        # etcd, so a long-lived controller holds only what is still running.
        self.committer.mark(run, lambda: self._finished(run))
        log.info("run finished", run_id=run.msg.id, state=lc.run_state_name(final))

    def _finished(self, run: RunEntry) -> None:
        """The run's final state is in etcd: count it, record its span, let it go."""
        m = run.msg
        state = lc.run_state_name(m.state)
        self.metrics.runs_finished.labels(state).inc()
        duration = (m.finished_at.ToNanoseconds() - m.created_at.ToNanoseconds()) / 1e9
        self.metrics.run_duration.labels(state).observe(max(duration, 0.0))
        try:
            if self.spans:
                record_run_span(self.tracer, m, [e.msg for e in run.tasks.values()])
        except Exception:  # a tracing bug must not keep a finished run in memory
            log.exception("cannot record the run's span", run_id=m.id)
        self.cache.evict(run)
