"""The scheduling loop: each pass asks :func:`tether.controller.scheduler.plan` where ready
tasks go under the configured policy, renders their templates, and binds them to their nodes.
The assignment is sent once the bind is committed.
"""

from __future__ import annotations

import asyncio
import time

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.controller.cache import Cache, TaskKey
from tether.controller.committer import Committer
from tether.controller.dispatch import Dispatch, render
from tether.controller.metrics import Metrics
from tether.controller.progress import Progress
from tether.controller.records import RunEntry, TaskEntry, now
from tether.controller.scheduler import Binding, Policy, TaskRequest, plan
from tether.sdk.telemetry import get_logger
from tether.sdk.templating import TemplateError

__all__ = ["Placer"]

log = get_logger("controller.engine")


class Placer:
    """Places READY tasks on nodes whenever the cache is kicked."""

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        metrics: Metrics,
        dispatch: Dispatch,
        progress: Progress,
        policy: Policy,
    ) -> None:
        self.cache = cache
        self.committer = committer
        self.metrics = metrics
        self.dispatch = dispatch
        self.progress = progress
        self.policy = policy

    async def loop(self) -> None:
        """Run a pass each time the cache is kicked, until cancelled."""
        while True:
            await self.cache.wakeup.wait()
            self.cache.wakeup.clear()
            try:
                self.schedule_pass()
            except Exception:  # a bug in one pass must not stop scheduling
                log.exception("scheduling pass failed")
            await asyncio.sleep(0)

    def _queue(self) -> list[tuple[TaskKey, TaskEntry]]:
        """The ready queue in order; entries no longer READY leave it."""
        out = []
        for key in list(self.cache.ready):
            _, e = self.cache.task(*key)
            if e is None or e.msg.state != lc.READY:
                self.cache.ready.pop(key, None)
                continue
            out.append((key, e))
        return out

    def schedule_pass(self) -> None:
        """Place what can be placed now; note why tasks no node can hold are waiting."""
        if not self.cache.ready:
            return
        queue = self._queue()
        while queue:
            ready = [
                TaskRequest.of(k, e.msg.spec.resources, seq=i) for i, (k, e) in enumerate(queue)
            ]
            p = plan(ready, self.cache.connected_views(), self.policy)
            bound = {b.key: b for b in p.bindings}
            for i, (key, e) in enumerate(queue):
                why = p.reasons.get(key, "")
                if why and e.msg.waiting_reason != why:
                    e.msg.waiting_reason = why
                    self.committer.mark(e)
                if key in bound and not self._place(key, e, bound[key]):
                    # Its template did not render and it holds nothing: plan the rest again,
                    # so what the plan kept for it goes to the tasks behind it.
                    queue = queue[i + 1 :]
                    break
            else:
                return

    def _place(self, key: TaskKey, e: TaskEntry, b: Binding) -> bool:
        """Render and bind one planned task; False when its template failed it."""
        run = self.cache.runs[key[0]]
        self.cache.ready.pop(key, None)
        try:
            rendered = render(run, e.msg.spec)
        except TemplateError as err:
            e.msg.reason, e.msg.message = "template", str(err)
            self.progress.finish_task(run, e, lc.FAILED)
            return False
        self._bind(run, e, b.node, list(b.gpu_indices), rendered)
        return True

    def _bind(
        self, run: RunEntry, e: TaskEntry, node: str, gpus: list[int], rendered: t.TaskSpec | None
    ) -> None:
        since = self.cache.ready_since.pop((run.msg.id, e.msg.spec.name), None)
        if since is not None:
            self.metrics.schedule_latency.observe(time.monotonic() - since)
        self.metrics.attempts_started.inc()
        m = e.msg
        lc.move_task(m, lc.SCHEDULED)
        m.attempt += 1
        m.node = node
        m.waiting_reason = ""
        m.ClearField("not_before")
        lc.new_attempt(m, number=m.attempt, node=node, scheduled_at=now(), gpu_indices=gpus)
        self.cache.account(e, +1)
        if run.msg.state == lc.RUN_PENDING:
            lc.move_run(run.msg, lc.RUN_RUNNING)
            run.msg.started_at.CopyFrom(now())
            self.committer.mark(run)
        e.rendered = rendered
        self.committer.mark(e, lambda: self.dispatch.assign(run, e))
