"""Runs assigned attempts on this node: files, environment, timeouts, cancellation, results.

Each attempt gets a directory ``<work_dir>/<run>/<task>/<attempt>/`` holding its inputs, its
output file and its logs. Final reports are kept until the controller acknowledges them, so a
result survives a broken stream or a controller restart.
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

from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import LaunchSpec, Runtime, RuntimeError_, TaskHandle
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
        self.started_count = 0

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
        self.unacked.pop(_key(ref), None)

    async def stop_all(self, grace: float) -> None:
        """Stop every attempt (agent shutdown)."""
        for att in self.attempts.values():
            att.cancel_reason = "agent shutting down"
            att.cancel_grace = grace
            att.cancelled.set()
        tasks = [a.task for a in self.attempts.values() if a.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace + 5)

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
            if not status.HasField("finished_at"):
                status.finished_at.CopyFrom(_now())
            span.set_attribute("tether.state", t.TaskState.Name(status.state))
            span.set_attribute("tether.exit_code", status.exit_code)
            if status.state != t.TaskState.TASK_STATE_SUCCEEDED:
                span.set_status(trace.Status(trace.StatusCode.ERROR, status.reason))
        key = _key(ref)
        self.unacked[key] = status
        self.attempts.pop(key, None)
        self.report(status)

    async def _execute(
        self, att: _Attempt, a: agent_pb2.AssignTask, status: agent_pb2.TaskStatus, traceparent: str
    ) -> None:
        spec, ref = a.spec, a.ref
        d = self.config.work_dir / ref.run_id / spec.name / str(ref.attempt)
        d.mkdir(parents=True, exist_ok=True)
        out_file, in_file = d / "output.json", d / "inputs.json"
        with contextlib.suppress(FileNotFoundError):
            out_file.unlink()
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
        launch = LaunchSpec(
            name=f"{ref.run_id}-{spec.name}-{ref.attempt}",
            command=list(spec.command),
            env=env,
            working_dir=spec.working_dir,
            attempt_dir=d,
            stdout_path=d / "stdout.log",
            stderr_path=d / "stderr.log",
            image=spec.image,
            cpu=spec.resources.cpu,
            memory_bytes=spec.resources.memory_bytes,
            gpu_indices=list(a.gpu_indices),
            labels={
                "tether.run": ref.run_id,
                "tether.task": spec.name,
                "tether.attempt": str(ref.attempt),
                "tether.node": self.config.node,
            },
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
        timeout = spec.timeout.seconds + spec.timeout.nanos / 1e9
        wait = asyncio.ensure_future(att.handle.wait())
        cancel = asyncio.ensure_future(att.cancelled.wait())
        started = time.monotonic()
        done, _ = await asyncio.wait(
            {wait, cancel}, timeout=timeout or None, return_when=asyncio.FIRST_COMPLETED
        )
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
                self._read_output(out_file, status)
            else:
                status.state = t.TaskState.TASK_STATE_FAILED
                status.reason = result.reason or "exit_code"
                status.message = result.message or f"exited with code {result.exit_code}"
        status.finished_at.CopyFrom(_now())
        status.stdout_tail = _tail(launch.stdout_path)
        status.stderr_tail = _tail(launch.stderr_path)

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
