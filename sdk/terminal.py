"""Terminal output and option parsing shared by the ``tether`` commands.

The client commands (``tether.sdk.cli``), ``tether dev`` and ``tether agent`` all show runs
and parse ``KEY=VALUE`` options the same way; this module is what they share, so none of
them imports another's command module.
"""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tether.api.v1 import types_pb2 as t
from tether.sdk.client import Client
from tether.sdk.quantities import format_duration
from tether.sdk.states import run_state_name, task_state_name

__all__ = [
    "console",
    "err_console",
    "follow_run",
    "key_values",
    "print_failures",
    "print_results",
    "state_label",
    "task_table",
]

# Off a terminal (a pipe, a file) nothing is cut to fit a width: scripts get whole ids.
_PIPE_WIDTH = 10_000
console = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err_console = Console(stderr=True)

# How much of a failed task's stderr tail is shown under its run (the tail holds 4 KiB).
FAILURE_TAIL_LINES = 15

_STATE_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "RUNNING": "cyan",
    "SCHEDULED": "blue",
    "READY": "white",
    "PENDING": "dim",
    "RETRYING": "yellow",
    "CANCELLED": "magenta",
    "SKIPPED": "dim",
    "LOST": "yellow",
    "PREEMPTED": "yellow",
}


def state_label(name: int, run: bool = False) -> str:
    """A run's or task's state as a short, coloured rich markup label."""
    s = run_state_name(name) if run else task_state_name(name)
    return f"[{_STATE_STYLE.get(s, 'white')}]{s}[/]"


def key_values(values: tuple[str, ...], option: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` options (``--param``, ``--label``) into a dict."""
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{v!r}: use KEY=VALUE", param_hint=option)
        out[k] = val
    return out


def task_table(run: t.Run, wide: bool = False) -> Table:
    """A table of a run's tasks and their states; ``wide`` adds columns and cuts nothing."""
    table = Table(
        title=f"run {run.id} ({run.workflow_name}): " + state_label(run.state, run=True),
        title_justify="left",
        # Why the run ended as it did (cancelled by whom, timed out), when it says.
        caption=escape(run.message) if run.message else None,
        caption_justify="left",
    )
    cols = ["task", "state", "node", "attempt", "duration", "exit", "detail"]
    if wide:
        cols[6:6] = ["reason", "lost", "image"]
    for col in cols:
        table.add_column(col, no_wrap=col == "task")
    for tk in sorted(run.tasks, key=lambda x: x.index):
        dur = ""
        if tk.HasField("started_at"):
            end = tk.finished_at.ToNanoseconds() if tk.HasField("finished_at") else time.time_ns()
            dur = format_duration(max(0, end - tk.started_at.ToNanoseconds()) / 1e9)
        finished = tk.state in (t.TaskState.TASK_STATE_SUCCEEDED, t.TaskState.TASK_STATE_FAILED)
        # A waiting reason only while queued: controllers before 2026-12-07 left it on tasks
        # cancelled in the queue, in place of why they were cancelled.
        waiting = tk.waiting_reason if tk.state == t.TaskState.TASK_STATE_READY else ""
        detail = waiting or (tk.message if tk.state != t.TaskState.TASK_STATE_SUCCEEDED else "")
        row = [
            tk.spec.name,
            state_label(tk.state),
            tk.node,
            str(tk.attempt or ""),
            dur,
            str(tk.exit_code) if finished else "",
        ]
        if wide:
            row += [tk.reason, str(tk.lost_attempts or ""), tk.spec.image]
        # Messages are the tasks' own text: brackets in them are not markup.
        row.append(escape(detail if wide else detail[:80]))
        table.add_row(*row)
    return table


def print_failures(run: t.Run, target: Console | None = None) -> None:
    """Under a run, the end of each failed task's stderr: why it failed, without a search.

    The tail is what the controller keeps with the task (the last 4 KiB); ``tether logs``
    prints the whole of it from the node.
    """
    out = target or console
    for tk in sorted(run.tasks, key=lambda x: x.index):
        if tk.state != t.TaskState.TASK_STATE_FAILED:
            continue
        why = tk.message or f"exited with code {tk.exit_code}"
        out.print(f"[bold red]{tk.spec.name} failed[/]: {escape(why)}", highlight=False)
        lines = tk.stderr_tail.rstrip().splitlines()
        if not lines:
            continue
        shown = lines[-FAILURE_TAIL_LINES:]
        cut = len(lines) - len(shown)
        more = f", {cut} lines above" if cut else ""
        out.print(
            f"[dim]--- stderr of {tk.spec.name} (attempt {tk.attempt}, last lines{more}; "
            f"all of it: tether logs {run.id} {tk.spec.name}) ---[/]",
            highlight=False,
        )
        for line in shown:
            out.print(f"  {line}", markup=False, highlight=False)


def follow_run(client: Client, run_id: str) -> t.Run:
    """Show a live table of the run until it finishes; return the run with its tasks.

    Like :meth:`Client.follow`, it rides out a controller restart or failover.
    """
    run = t.Run(id=run_id)
    tasks: dict[str, t.TaskRun] = {}
    with Live(task_table(run), console=console, refresh_per_second=8, transient=False) as live:
        for ev in client.follow(run_id):
            if ev.HasField("snapshot"):
                run = ev.snapshot
                tasks = {tk.spec.name: tk for tk in run.tasks}
            else:
                if ev.HasField("task"):
                    tasks[ev.task.spec.name] = ev.task
                if ev.run_state:
                    run.state = ev.run_state
            del run.tasks[:]
            run.tasks.extend(tasks.values())
            live.update(task_table(run))
        # The events do not carry the run's final message and times: read it once more.
        run = client.run(run_id).wait()
        live.update(task_table(run))
    return run


def print_results(run: t.Run) -> None:
    """Print what the run's final tasks printed (or their JSON output), then the failures.
    The run's message is the caption of the table :func:`follow_run` left above."""
    console.print()  # the live table leaves the cursor at the end of its last line
    children = {d for tk in run.tasks for d in tk.spec.depends_on}
    for tk in sorted(run.tasks, key=lambda x: x.index):
        if tk.spec.name in children:
            continue
        # A person reads what the final tasks printed; their JSON output if they printed nothing.
        if tk.stdout_tail.strip():
            console.print(f"[bold]{tk.spec.name}:[/]")
            console.print(tk.stdout_tail.rstrip(), markup=False, highlight=False)
        elif tk.outputs_json:
            console.print(f"[bold]{tk.spec.name} output:[/]")
            console.print_json(tk.outputs_json)
    print_failures(run)
