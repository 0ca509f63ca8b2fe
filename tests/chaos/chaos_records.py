"""What the chaos scenarios share: a task that records its own life, the checks over those
records, and the report.

Every task of a chaos workflow appends JSON lines to one records file (``O_APPEND``, one
``write`` per line, so concurrent attempts never interleave within a line): ``start`` when it
begins, ``alive`` every :data:`ALIVE_EVERY` seconds, ``end`` when it finishes by itself. A
killed attempt writes no ``end``; it died at most :data:`ALIVE_EVERY` after its last line, so
the checks count it as running until then — overlaps are measured on the safe side.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

__all__ = [
    "ALIVE_EVERY",
    "FENCE_WINDOW",
    "TTL",
    "Attempt",
    "Records",
    "check",
    "recorded_workflow",
    "write_report",
]

# The node lease TTL every scenario runs with (seconds), as the issue asks.
TTL = 3
# How often a running task says it is alive: the resolution of the overlap check.
ALIVE_EVERY = 0.05
# Overlap allowed between two attempts of one task. Process-runtime tasks are stopped by their
# agent (fencing) or its reaper before a copy may start, so none is allowed; the measured
# maximum goes in the report.
FENCE_WINDOW = 0.0

_TASK_CODE = """\
import json, os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
me = {"run": os.environ["TETHER_RUN_ID"], "task": os.environ["TETHER_TASK"],
      "attempt": int(os.environ["TETHER_ATTEMPT"]), "node": os.environ["TETHER_OUTPUT_FILE"],
      "pid": os.getpid()}
def say(ev):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps({**me, "ev": ev, "t": time.time()}) + "\\n").encode())
    os.close(fd)
say("start")
end = time.time() + seconds
while time.time() < end:
    time.sleep(min(ALIVE, max(0.0, end - time.time())))
    say("alive")
say("end")
json.dump({"done": me["task"]}, open(os.environ["TETHER_OUTPUT_FILE"], "w"))
""".replace("ALIVE", repr(ALIVE_EVERY))

# The same records from a shell, for scenarios with many short tasks (no Python start-up).
_SHELL_CODE = (
    'say() { printf \'{"run":"%s","task":"%s","attempt":%s,"node":"%s","pid":%s,'
    '"ev":"%s","t":%s}\\n\' "$TETHER_RUN_ID" "$TETHER_TASK" "$TETHER_ATTEMPT" "$TETHER_OUTPUT_FILE"'
    ' $$ "$1" "$(date +%s.%N)" >> "$0"; }; say start; say end'
)


def recorded_workflow(
    name: str,
    records: Path,
    layers: int,
    width: int,
    seconds: float,
    cpu: float = 0.5,
    shell: bool = False,
) -> Workflow:
    """A layered DAG of ``layers`` by ``width`` recording tasks of ``seconds`` each; each task
    depends on every task of the layer before (``retries`` 0: a lost or fenced attempt must
    not count against it). ``shell`` records from ``sh`` at once instead, for many short
    tasks."""
    if shell:
        command = ["sh", "-c", _SHELL_CODE, str(records)]
    else:
        command = [sys.executable, "-c", _TASK_CODE, str(records), str(seconds)]
    wf = Workflow(name)
    prev: list = []
    for layer in range(layers):
        prev = [wf.task(f"l{layer}-{i}", command, depends_on=prev, cpu=cpu) for i in range(width)]
    return wf


def _node_of(output_file: str) -> str:
    """The node an attempt ran on, from its output file's path: tasks are not told their
    node, but each agent of a scenario has its work dir at ``.../agents/<node>/``."""
    parts = Path(output_file).parts
    return parts[parts.index("agents") + 1] if "agents" in parts else ""


@dataclass
class Attempt:
    """One attempt of one task as its own records tell it."""

    run: str
    task: str
    attempt: int
    node: str
    pid: int
    start: float
    last: float
    ended: bool = False

    @property
    def until(self) -> float:
        """When it stopped running, at the latest."""
        return self.last if self.ended else self.last + ALIVE_EVERY


@dataclass
class Records:
    """The parsed records file of one scenario."""

    path: Path
    attempts: dict[tuple[str, str, int], Attempt] = field(default_factory=dict)
    # How many "start" lines each (run, task, attempt) has: more than one is a doubled attempt.
    start_lines: Counter = field(default_factory=Counter)

    @classmethod
    def read(cls, path: Path) -> Records:
        out = cls(path)
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            r = json.loads(line)
            key = (r["run"], r["task"], r["attempt"])
            if r["ev"] == "start":
                out.start_lines[key] += 1
            a = out.attempts.get(key)
            if a is None:
                node = _node_of(r["node"])
                a = out.attempts[key] = Attempt(
                    r["run"], r["task"], r["attempt"], node, r["pid"], r["t"], r["t"]
                )
            a.last = max(a.last, r["t"])
            a.ended = a.ended or r["ev"] == "end"
        return out

    def of(self, run: str, task: str) -> list[Attempt]:
        """One task's attempts in start order."""
        return sorted(
            (a for a in self.attempts.values() if a.run == run and a.task == task),
            key=lambda a: a.start,
        )

    def running_on(self, node: str) -> list[Attempt]:
        """Attempts on ``node`` that have started and not ended."""
        return [a for a in self.attempts.values() if a.node == node and not a.ended]


def check(runs: list[t.Run], records_path: Path, success_counts: Counter) -> dict:
    """Check a scenario's outcome; return its numbers for the report.

    ``runs`` are the final runs; ``success_counts`` counts, per ``RUN_ID/TASK``, how many
    times etcd's history saw the task move into SUCCEEDED. Fails if a run did not succeed, a
    task has no finished attempt in the records (lost), a result was recorded other than once,
    one attempt number started twice, or two attempts of a task overlapped beyond
    :data:`FENCE_WINDOW`.
    """
    rec = Records.read(records_path)
    failed = [(r.id, r.message) for r in runs if r.state != t.RunState.RUN_STATE_SUCCEEDED]
    assert not failed, f"runs that did not succeed: {failed}"
    lost, double, overlaps = [], [], []
    max_overlap = None
    tasks = 0
    for run in runs:
        for task in run.tasks:
            tasks += 1
            key = f"{run.id}/{task.spec.name}"
            attempts = rec.of(run.id, task.spec.name)
            if not any(a.ended for a in attempts):
                lost.append(key)
            if success_counts.get(key, 0) != 1:
                double.append((key, success_counts.get(key, 0)))
            for i, a in enumerate(attempts):
                for b in attempts[i + 1 :]:
                    overlap = min(a.until, b.until) - max(a.start, b.start)
                    max_overlap = overlap if max_overlap is None else max(max_overlap, overlap)
                    if overlap > FENCE_WINDOW:
                        overlaps.append((key, a.attempt, b.attempt, round(overlap, 3)))
    restarted = [k for k, n in rec.start_lines.items() if n > 1]
    assert not lost, f"tasks with no finished attempt: {lost}"
    assert not double, f"results recorded other than once: {double}"
    assert not restarted, f"one attempt number started twice: {restarted}"
    assert not overlaps, f"attempts of one task that overlapped: {overlaps}"
    started = len(rec.attempts)
    return {
        "runs": len(runs),
        "tasks": tasks,
        "attempts_started": started,
        "attempts_rerun": started - tasks,
        "lost": len(lost),
        "double_completions": len(double),
        "overlapping_attempts": len(overlaps),
        # Negative: the closest a copy came to its predecessor (a gap, not an overlap).
        "max_overlap_s": None if max_overlap is None else round(max_overlap, 3),
    }


def report_path() -> Path:
    """``build/chaos-report.json`` at the checkout's root (``build/`` is not committed)."""
    return Path(__file__).resolve().parents[2] / "build" / "chaos-report.json"


def write_report(scenarios: dict[str, dict]) -> Path:
    """Write the report: each scenario's numbers, and the suite's settings."""
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "ttl_s": TTL,
        "fence_window_s": FENCE_WINDOW,
        "alive_every_s": ALIVE_EVERY,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "scenarios": scenarios,
    }
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path
