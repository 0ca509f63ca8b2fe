"""Runs assigned attempts on this node: files, environment, timeouts, cancellation, results.

Each attempt gets a directory ``<work_dir>/<run>/<task>/<attempt>/`` holding its inputs, its
output file, its logs and its final report. Final reports are kept until the controller
acknowledges them, so a result survives a broken stream or a controller restart; only then is
the attempt removed from the runtime (its container deleted), so that work a runtime keeps
across an agent restart is recovered (:meth:`Runner.recover`) and reported by the next agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import timestamp_pb2
from opentelemetry import trace

from tether.agent import layout
from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import (
    LaunchSpec,
    RecoveredTask,
    Runtime,
    RuntimeError_,
    TaskHandle,
)
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.telemetry import context_from_traceparent, get_logger, traceparent_of

__all__ = ["Runner"]

log = get_logger("agent.runner")

MAX_OUTPUT_BYTES = 64 * 1024
TAIL_BYTES = 4096

Key = tuple[str, str, int]


def _key(ref: agent_pb2.AttemptRef) -> Key:
    return (ref.run_id, ref.task, ref.attempt)


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _ref_of(labels: dict[str, str]) -> agent_pb2.AttemptRef | None:
    try:
        return agent_pb2.AttemptRef(
            run_id=labels[layout.RUN_LABEL],
            task=labels[layout.TASK_LABEL],
            attempt=int(labels[layout.ATTEMPT_LABEL]),
        )
    except (KeyError, ValueError):
        return None


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class _Attempt:
    ref: agent_pb2.AttemptRef
    task: asyncio.Task | None = None
    handle: TaskHandle | None = None
    cancel_reason: str = ""
    cancel_grace: float = 10.0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class Runner:
    """Starts, watches and stops attempts; reports what it sees through ``report``.

    Args:
        config: The agent's configuration.
        runtime: Where attempts run.
        tracer: Tracer for the run spans.
        report: Called with every status to send to the controller.
    """

    def __init__(
        self,
        config: AgentConfig,
        runtime: Runtime,
        tracer: trace.Tracer,
        report: Callable[[agent_pb2.TaskStatus], None],
        on_event: Callable[[agent_pb2.TaskEventReport], None] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.tracer = tracer
        self.report = report
        self.on_event = on_event
        self.attempts: dict[Key, _Attempt] = {}
        self.unacked: dict[Key, agent_pb2.TaskStatus] = {}
        # Ended attempts whose reports are not acknowledged yet: removed from the runtime on ack.
        self.ended: dict[Key, TaskHandle] = {}
        self.started_count = 0
        self._background: set[asyncio.Task] = set()

    def event(self, ref: agent_pb2.AttemptRef, kind: str, message: str) -> None:
        """Tell the controller something happened to an attempt (best effort, not retried)."""
        if self.on_event is None:
            return
        ev = t.TaskEvent(time=_now(), attempt=ref.attempt, kind=kind, message=message[:1024])
        self.on_event(agent_pb2.TaskEventReport(ref=ref, event=ev))

    def is_running(self, ref: agent_pb2.AttemptRef) -> bool:
        """Whether the attempt is assigned here and not over (its output may still grow)."""
        return _key(ref) in self.attempts

    def running_refs(self) -> list[agent_pb2.AttemptRef]:
        return [a.ref for a in self.attempts.values()]

    def pending_reports(self) -> list[agent_pb2.TaskStatus]:
        return list(self.unacked.values())

    def assign(self, a: agent_pb2.AssignTask) -> None:
        """Start an attempt; a repeated assignment of the same attempt is ignored."""
        key = _key(a.ref)
        if key in self.attempts:
            return
        if key in self.unacked:
            self.report(self.unacked[key])
            return
        att = _Attempt(ref=a.ref)
        self.attempts[key] = att
        att.task = asyncio.create_task(self._run(att, a), name=f"attempt {key}")

    def cancel(self, c: agent_pb2.CancelTask) -> None:
        """Stop an attempt (SIGTERM, then SIGKILL after the grace period)."""
        att = self.attempts.get(_key(c.ref))
        if att is None:
            return
        att.cancel_reason = c.reason or "cancelled"
        att.cancel_grace = c.grace.seconds + c.grace.nanos / 1e9 if c.HasField("grace") else 10.0
        att.cancelled.set()

    def ack(self, ref: agent_pb2.AttemptRef) -> None:
        """The controller has the attempt's final report: forget it, remove it from the runtime."""
        key = _key(ref)
        self.unacked.pop(key, None)
        handle = self.ended.pop(key, None)
        if handle is not None:
            task = asyncio.create_task(self._remove(key, handle), name=f"remove {key}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @staticmethod
    async def _remove(key: Key, handle: TaskHandle) -> None:
        try:
            await handle.remove()
        except Exception as e:
            log.warning("cannot remove an ended attempt", attempt=key, error=str(e))

    async def stop_all(self, grace: float, leave_running: bool = False) -> None:
        """Stop every attempt (agent shutdown).

        Args:
            grace: SIGTERM-to-SIGKILL grace period, seconds.
            leave_running: Let go of attempts without stopping them, for the next agent on
                this node to recover (only runtimes that keep work across agents, ``docker``).
        """
        if leave_running:
            tasks = [a.task for a in self.attempts.values() if a.task]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            self.attempts.clear()
            return
        stopping = set(self.attempts)
        for att in self.attempts.values():
            att.cancel_reason = "agent shutting down"
            att.cancel_grace = grace
            att.cancelled.set()
        tasks = [a.task for a in self.attempts.values() if a.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace + 5)
        # Attempts this agent stopped itself did not fail: remove them so that a restarted
        # agent does not resend their CANCELLED reports, and the controller, seeing them
        # gone, retries them as lost.
        for key in stopping:
            report = self.unacked.get(key)
            handle = self.ended.get(key)
            if report and handle and report.state == t.TaskState.TASK_STATE_CANCELLED:
                del self.ended[key]
                await self._remove(key, handle)
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)

    async def recover(self) -> int:
        """Adopt the attempts a previous agent on this node left in the runtime.

        Call once, before the first connection to the controller. Running attempts are
        tracked as if this agent had started them (waited for, cancellable, timed out, and
        listed in ``Register.running``); ended ones become final reports at once (sent in
        ``Register.pending_reports``). The controller adopts current attempts and has stale
        ones stopped. Returns how many attempts were found.
        """
        found = await self.runtime.recover()
        for rt in found:
            ref = _ref_of(rt.labels)
            if ref is None:
                continue
            key = _key(ref)
            if key in self.attempts or key in self.unacked:
                continue
            att = _Attempt(ref=ref, handle=rt.handle)
            log.info(
                "recovered attempt",
                run_id=ref.run_id,
                task=ref.task,
                attempt=ref.attempt,
                running=rt.running,
            )
            if rt.running:
                self.attempts[key] = att
                att.task = asyncio.create_task(self._run_recovered(att, rt), name=f"adopt {key}")
            else:
                await self._run_recovered(att, rt)
        return len(found)

    async def _run(self, att: _Attempt, a: agent_pb2.AssignTask) -> None:
        spec = a.spec
        ref = a.ref
        status = agent_pb2.TaskStatus(ref=ref)
        with self.tracer.start_as_current_span(
            f"run {spec.name}",
            context=context_from_traceparent(a.traceparent),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "tether.run_id": ref.run_id,
                "tether.task": spec.name,
                "tether.attempt": ref.attempt,
                "tether.runtime": self.runtime.name,
            },
        ) as span:
            try:
                await self._execute(att, a, status, traceparent_of(span))
            except Exception as e:  # any agent-side failure is the attempt's result
                log.exception("attempt failed in the agent", task=spec.name)
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = "runtime_error"
                status.message = f"agent error: {e}"
            self._end_span(span, status)
        self._conclude(att, status, self._dir(ref))

    def _dir(self, ref: agent_pb2.AttemptRef) -> Path:
        return layout.attempt_dir(self.config.work_dir, ref.run_id, ref.task, ref.attempt)

    @staticmethod
    def _end_span(span: trace.Span, status: agent_pb2.TaskStatus) -> None:
        if not status.HasField("finished_at"):
            status.finished_at.CopyFrom(_now())
        span.set_attribute("tether.state", t.TaskState.Name(status.state))
        span.set_attribute("tether.exit_code", status.exit_code)
        if status.state != t.TaskState.TASK_STATE_SUCCEEDED:
            span.set_status(trace.Status(trace.StatusCode.ERROR, status.reason))

    def _conclude(self, att: _Attempt, status: agent_pb2.TaskStatus, d: Path) -> None:
        """Keep the final report until acknowledged (in memory and beside the attempt's
        files, for a restarted agent), then send it."""
        key = _key(att.ref)
        if d.is_dir():
            try:
                (d / layout.STATUS_FILE).write_bytes(status.SerializeToString())
            except OSError as e:
                log.warning("cannot keep the final report", attempt=key, error=str(e))
        self.unacked[key] = status
        self.attempts.pop(key, None)
        if att.handle is not None:
            self.ended[key] = att.handle
        self.report(status)

    async def _run_recovered(self, att: _Attempt, rt: RecoveredTask) -> None:
        ref = att.ref
        d = self._dir(ref)
        saved = self._saved_status(d, ref) if not rt.running else None
        if saved is not None:
            # The previous agent had finished this attempt; only its report was not acked.
            self._conclude(att, saved, d)
            return
        status = agent_pb2.TaskStatus(ref=ref)
        if rt.started_at:
            status.started_at.FromNanoseconds(int(rt.started_at * 1e9))
        try:
            timeout = float(rt.labels.get(layout.TIMEOUT_LABEL) or 0)
        except ValueError:
            timeout = 0.0
        elapsed = max(0.0, time.time() - rt.started_at) if rt.started_at else 0.0
        with self.tracer.start_as_current_span(
            f"recover {ref.task}",
            context=context_from_traceparent(rt.labels.get(layout.TRACEPARENT_LABEL, "")),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "tether.run_id": ref.run_id,
                "tether.task": ref.task,
                "tether.attempt": ref.attempt,
                "tether.runtime": self.runtime.name,
            },
        ) as span:
            try:
                await self._watch(att, status, timeout, elapsed, d)
            except Exception as e:
                log.exception("recovered attempt failed in the agent", task=ref.task)
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = "runtime_error"
                status.message = f"agent error: {e}"
            self._end_span(span, status)
        self._conclude(att, status, d)

    @staticmethod
    def _saved_status(d: Path, ref: agent_pb2.AttemptRef) -> agent_pb2.TaskStatus | None:
        try:
            saved = agent_pb2.TaskStatus.FromString((d / layout.STATUS_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return saved if _key(saved.ref) == _key(ref) else None

    async def _execute(
        self, att: _Attempt, a: agent_pb2.AssignTask, status: agent_pb2.TaskStatus, traceparent: str
    ) -> None:
        spec, ref = a.spec, a.ref
        d = self._dir(ref)
        d.mkdir(parents=True, exist_ok=True)
        out_file, in_file = d / layout.OUTPUT_FILE, d / layout.INPUTS_FILE
        for stale in (out_file, d / layout.STATUS_FILE):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        inputs = {
            "params": dict(a.params),
            "tasks": {k: (json.loads(v) if v else None) for k, v in a.upstream_outputs.items()},
        }
        in_file.write_text(json.dumps(inputs))
        env = dict(spec.env)
        env.update(
            {
                "TETHER_RUN_ID": ref.run_id,
                "TETHER_TASK": spec.name,
                "TETHER_ATTEMPT": str(ref.attempt),
                "TETHER_OUTPUT_FILE": self.runtime.task_path(out_file),
                "TETHER_INPUTS_FILE": self.runtime.task_path(in_file),
                "TRACEPARENT": traceparent,
            }
        )
        if a.gpu_indices:
            devices = ",".join(str(i) for i in a.gpu_indices)
            env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = devices
        timeout = spec.timeout.seconds + spec.timeout.nanos / 1e9
        labels = {
            layout.RUN_LABEL: ref.run_id,
            layout.TASK_LABEL: spec.name,
            layout.ATTEMPT_LABEL: str(ref.attempt),
            layout.NODE_LABEL: self.config.node,
            layout.TRACEPARENT_LABEL: traceparent,
        }
        if timeout:
            labels[layout.TIMEOUT_LABEL] = f"{timeout:g}"
        launch = LaunchSpec(
            name=f"{ref.run_id}-{spec.name}-{ref.attempt}",
            command=list(spec.command),
            env=env,
            working_dir=spec.working_dir,
            attempt_dir=d,
            stdout_path=d / layout.STDOUT_FILE,
            stderr_path=d / layout.STDERR_FILE,
            image=spec.image,
            cpu=spec.resources.cpu,
            memory_bytes=spec.resources.memory_bytes,
            gpu_indices=list(a.gpu_indices),
            labels=labels,
            image_pull_policy=spec.image_pull_policy,
            log_limit_bytes=self.config.log_limit_bytes,
            on_event=lambda kind, message: self.event(ref, kind, message),
        )
        status.started_at.CopyFrom(_now())
        try:
            att.handle = await self.runtime.start(launch)
        except RuntimeError_ as e:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason, status.message, status.exit_code = e.reason, str(e), -1
            return
        self.started_count += 1
        self.report(
            agent_pb2.TaskStatus(
                ref=ref, state=t.TaskState.TASK_STATE_RUNNING, started_at=status.started_at
            )
        )
        await self._watch(att, status, timeout, 0.0, d)

    async def _watch(
        self,
        att: _Attempt,
        status: agent_pb2.TaskStatus,
        timeout: float,
        elapsed: float,
        d: Path,
    ) -> None:
        """Wait for a started attempt to end, be cancelled or time out; fill in ``status``.

        ``elapsed`` is how long the attempt has run already (a recovered one), seconds.
        """
        assert att.handle is not None
        wait = asyncio.ensure_future(att.handle.wait())
        cancel = asyncio.ensure_future(att.cancelled.wait())
        started = time.monotonic() - elapsed
        try:
            done, _ = await asyncio.wait(
                {wait, cancel},
                timeout=max(0.0, timeout - elapsed) if timeout else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            # The agent lets go of the attempt (it keeps running in the runtime).
            wait.cancel()
            cancel.cancel()
            raise
        cancel.cancel()
        status.stdout_tail = ""
        if wait not in done:
            grace = att.cancel_grace if cancel in done else self.config.stop_grace
            await att.handle.stop(grace)
            result = await wait
            status.exit_code = result.exit_code
            if cancel in done:
                status.state = t.TaskState.TASK_STATE_CANCELLED
                status.reason, status.message = "cancelled", att.cancel_reason
            else:
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = "timeout"
                status.message = (
                    f"killed after {time.monotonic() - started:.1f}s (timeout {timeout:g}s)"
                )
        else:
            result = wait.result()
            status.exit_code = result.exit_code
            if result.exit_code == 0 and not result.reason:
                self._read_output(d / layout.OUTPUT_FILE, status)
            else:
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = result.reason or "exit_code"
                status.message = result.message or f"exited with code {result.exit_code}"
        status.finished_at.CopyFrom(_now())
        status.stdout_tail = _tail(d / layout.STDOUT_FILE)
        status.stderr_tail = _tail(d / layout.STDERR_FILE)

    @staticmethod
    def _read_output(path: Path, status: agent_pb2.TaskStatus) -> None:
        status.state = t.TaskState.TASK_STATE_SUCCEEDED
        if not path.exists():
            return
        size = path.stat().st_size
        if size > MAX_OUTPUT_BYTES:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason = "output"
            status.message = f"output file is {size} bytes; at most {MAX_OUTPUT_BYTES}"
            return
        text = path.read_text(errors="replace")
        try:
            json.loads(text or "null")
        except ValueError as e:
            status.state = t.TaskState.TASK_STATE_FAILED
            status.reason = "output"
            status.message = f"output file is not JSON: {e}"
            return
        status.outputs_json = text
