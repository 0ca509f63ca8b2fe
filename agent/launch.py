"""What an attempt is given and what it gives back: its directory, environment and labels.

Everything here is plain computation over the assignment (plus small synchronous file
writes and reads in the attempt directory), with no event loop and no runtime, so that the
contract between a task and the agent is testable on its own:

* in: ``inputs.json`` (params and upstream outputs), ``TETHER_*`` variables, ``TRACEPARENT``,
  the GPU selection, and labels that let a restarted agent recognise the attempt;
* out: ``output.json`` (JSON, at most :data:`MAX_OUTPUT_BYTES`) and the tails of its logs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from tether.agent import layout
from tether.agent.runtimes.base import LaunchSpec
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.constants import LOG_TAIL_BYTES, MAX_OUTPUT_BYTES
from tether.sdk.redaction import REDACTED, redact_text

__all__ = [
    "MAX_OUTPUT_BYTES",
    "REDACTED",
    "TAIL_BYTES",
    "inputs_of",
    "labels_of",
    "launch_spec",
    "read_output",
    "redact",
    "stage",
    "tail",
    "task_env",
    "timeout_of",
    "write_file",
]

# Both limits are shared with the controller, which enforces them again.
TAIL_BYTES = LOG_TAIL_BYTES
# What an earlier try of the same attempt may have left in its directory, not to be mistaken
# for this try's: its output, its final report, and its logs (a runtime creates the logs by
# the first output, so an earlier try's log must not pass for this one's).
_STALE = (layout.OUTPUT_FILE, layout.STATUS_FILE, layout.STDOUT_FILE, layout.STDERR_FILE)
# inputs.json of a task with no params and no upstream outputs.
_NO_INPUTS = json.dumps({"params": {}, "tasks": {}}).encode()
_SUCCEEDED = t.TaskState.TASK_STATE_SUCCEEDED


def timeout_of(spec: t.TaskSpec) -> float:
    """The task's timeout in seconds; 0 means none."""
    return spec.timeout.seconds + spec.timeout.nanos / 1e9


def inputs_of(a: agent_pb2.AssignTask) -> dict:
    """The content of ``inputs.json``: the run's params and the upstream tasks' outputs."""
    return {
        "params": dict(a.params),
        "tasks": {k: (json.loads(v) if v else None) for k, v in a.upstream_outputs.items()},
    }


def stage(d: str, a: agent_pb2.AssignTask) -> None:
    """Prepare the attempt directory ``d``: create it, write the inputs file.

    A retried assignment of the same attempt may find an earlier output, final report or
    logs there; they are removed so that none is mistaken for this run's. A new directory
    has nothing stale, and costs no look-ups for it.
    """
    if a.ref.attempt == 1:
        # Most attempts are a task's first: its directory is new too (in an existing run's).
        try:
            os.mkdir(os.path.dirname(d))
        except FileNotFoundError:
            os.makedirs(os.path.dirname(d), exist_ok=True)
        except FileExistsError:
            pass
    try:
        os.mkdir(d)
    except FileNotFoundError:  # a later attempt of a task this node never ran
        os.makedirs(d, exist_ok=True)
    except FileExistsError:
        for stale in _STALE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{d}/{stale}")
    if a.params or a.upstream_outputs:
        inputs = json.dumps(inputs_of(a)).encode()
    else:
        inputs = _NO_INPUTS
    write_file(f"{d}/{layout.INPUTS_FILE}", inputs)


def write_file(path: str, data: bytes) -> None:
    """Create or replace the file ``path`` with ``data`` (plain system calls: an attempt
    writes a few small files, where Python's file objects cost more than the writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def task_env(
    a: agent_pb2.AssignTask, d: str, traceparent: str, task_path: Callable[[str], str]
) -> dict[str, str]:
    """The task's environment: its spec's ``env``, its secrets' values, and what tether sets.

    Args:
        a: The assignment.
        d: The attempt directory on this host.
        traceparent: W3C trace context of the run span, so the task's spans join the trace.
        task_path: Maps a host path to the path the task sees (inside a container, say).
    """
    spec, ref = a.spec, a.ref
    env = dict(spec.env)
    env.update(a.secret_env)
    env.update(
        {
            "TETHER_RUN_ID": ref.run_id,
            "TETHER_TASK": spec.name,
            "TETHER_ATTEMPT": str(ref.attempt),
            "TETHER_OUTPUT_FILE": task_path(f"{d}/{layout.OUTPUT_FILE}"),
            "TETHER_INPUTS_FILE": task_path(f"{d}/{layout.INPUTS_FILE}"),
            "TRACEPARENT": traceparent,
        }
    )
    if a.gpu_indices:
        devices = ",".join(str(i) for i in a.gpu_indices)
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = devices
    return env


def labels_of(a: agent_pb2.AssignTask, node: str, traceparent: str) -> dict[str, str]:
    """The attempt's labels: what a restarted agent needs to adopt it (see ``layout``)."""
    spec, ref = a.spec, a.ref
    labels = {
        layout.RUN_LABEL: ref.run_id,
        layout.TASK_LABEL: spec.name,
        layout.ATTEMPT_LABEL: str(ref.attempt),
        layout.NODE_LABEL: node,
        layout.TRACEPARENT_LABEL: traceparent,
    }
    if a.traceparent:
        labels[layout.DISPATCH_LABEL] = a.traceparent
    timeout = timeout_of(spec)
    if timeout:
        labels[layout.TIMEOUT_LABEL] = f"{timeout:g}"
    return labels


def launch_spec(
    a: agent_pb2.AssignTask,
    d: str,
    *,
    node: str,
    traceparent: str,
    task_path: Callable[[str], str],
    log_limit_bytes: int,
    on_event: Callable[[str, str], None] | None = None,
    phase: Callable[[str], AbstractContextManager] | None = None,
) -> LaunchSpec:
    """Everything the runtime needs to start the attempt whose directory is ``d``."""
    extra = {"phase": phase} if phase is not None else {}
    spec, ref = a.spec, a.ref
    return LaunchSpec(
        name=f"{ref.run_id}-{spec.name}-{ref.attempt}",
        command=list(spec.command),
        env=task_env(a, d, traceparent, task_path),
        working_dir=spec.working_dir,
        attempt_dir=d,
        stdout_path=f"{d}/{layout.STDOUT_FILE}",
        stderr_path=f"{d}/{layout.STDERR_FILE}",
        image=spec.image,
        cpu=spec.resources.cpu,
        memory_bytes=spec.resources.memory_bytes,
        gpu_indices=list(a.gpu_indices),
        labels=labels_of(a, node, traceparent),
        image_pull_policy=spec.image_pull_policy,
        log_limit_bytes=log_limit_bytes,
        on_event=on_event,
        **extra,
    )


def redact(status: agent_pb2.TaskStatus, secret_values: Iterable[str]) -> None:
    """Mask the task's secret values in the log tails and message its report carries.

    The report is stored in etcd and shown by ``tether status``; only the task's own log
    files keep what it printed. (The controller masks them again: see ``sdk.redaction``.)
    """
    values = [v for v in secret_values if v]
    if not values:
        return
    for name in ("stdout_tail", "stderr_tail", "message"):
        setattr(status, name, redact_text(getattr(status, name), values))


def tail(path: str | Path) -> str:
    """The last :data:`TAIL_BYTES` of a log file ("" if it cannot be read, or is not a
    regular file: see ``layout.open_task_file``)."""
    try:
        f = layout.open_task_file(path, "r")
    except OSError:
        return ""
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return ""
            start = max(0, size - TAIL_BYTES)
            return os.pread(f.fileno(), size - start, start).decode("utf-8", "replace")
        except OSError:
            return ""


def read_output(path: str | Path, status: agent_pb2.TaskStatus) -> None:
    """Judge a cleanly exited attempt by its output file: succeeded with ``outputs_json``,
    or failed (``reason="output"``) when the file is too large or not JSON. No file is an
    empty output."""
    status.state = _SUCCEEDED
    try:
        f = layout.open_task_file(path, "r")
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:  # a link or a FIFO in its place: never followed, nor waited on
        status.state = t.TaskState.TASK_STATE_FAILED
        status.reason = "output"
        status.message = f"output file is not a regular file ({e.strerror})"
        return
    with f:
        # At most one byte past the limit, whatever its size said: it may still be growing.
        data = f.read(MAX_OUTPUT_BYTES + 1)
    if len(data) > MAX_OUTPUT_BYTES:
        status.state = t.TaskState.TASK_STATE_FAILED
        status.reason = "output"
        status.message = f"output file is over {MAX_OUTPUT_BYTES} bytes; at most that"
        return
    text = data.decode("utf-8", "replace")
    try:
        json.loads(text or "null")
    except ValueError as e:
        status.state = t.TaskState.TASK_STATE_FAILED
        status.reason = "output"
        status.message = f"output file is not JSON: {e}"
        return
    status.outputs_json = text
