"""The ``tether`` command.

Client subcommands live here; ``controller``, ``agent`` and ``dev`` are contributed by their
packages through the ``tether.commands`` entry-point group and imported only when run, so a
client-only install has a working ``tether``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from importlib.metadata import entry_points

import click
from rich.markup import escape
from rich.table import Table

from tether.api.v1 import types_pb2 as t
from tether.sdk.acl_cli import acl, tokens
from tether.sdk.certs_cli import certs_group
from tether.sdk.cli_globals import add_global_options, global_options
from tether.sdk.cli_output import (
    STREAM_FORMATS,
    emit,
    emit_stream,
    output_option,
    resolve,
    to_dict,
)
from tether.sdk.cli_secrets import add_secrets_commands
from tether.sdk.client import Client
from tether.sdk.constants import INT32_MAX, INT64_MAX
from tether.sdk.errors import TetherError
from tether.sdk.quantities import format_memory, parse_duration
from tether.sdk.spec import load_workflow
from tether.sdk.terminal import (
    console,
    err_console,
    follow_run,
    key_values,
    print_failures,
    print_results,
    state_label,
    task_table,
)
from tether.sdk.waterfall import render, timeline, trace_id_of, trace_url

# Client commands that talk to no controller, so take none of its options.
_LOCAL_COMMANDS = frozenset({"certs"})


class _LazyGroup(click.Group):
    """Adds the subcommands other packages contribute, importing them only when invoked."""

    def _contributed(self):
        return {ep.name: ep for ep in entry_points(group="tether.commands")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._contributed()))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            if name not in _LOCAL_COMMANDS:
                add_global_options(cmd)
            return cmd
        ep = self._contributed().get(name)
        if ep is None:
            return None
        try:
            return ep.load()
        except ImportError as e:
            raise click.ClickException(
                f"'tether {name}' needs the server extras: "
                f"pip install 'tether[{ep.module.split('.')[1]}]' ({e})"
            ) from None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tether", prog_name="tether", message="%(prog)s %(version)s")
@global_options
@click.pass_context
def cli(ctx: click.Context, controller: str, tls_ca: str, token: str) -> None:
    """Tether: run AI workflows (DAGs of tasks) on your own nodes.

    --controller, --tls-ca and --token may come before or after the command.
    """
    # Subcommands from other modules build their client with the same function.
    ctx.obj = {"controller": controller, "tls_ca": tls_ca, "token": token, "make_client": _client}


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj
    try:
        return Client(obj["controller"], tls_ca=obj["tls_ca"], token=obj["token"])
    except ValueError as e:  # an address without a port; the message names the setting
        raise click.ClickException(str(e)) from None


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", "wait_", is_flag=True, help="Follow the run live until it finishes.")
@click.option("--param", "-p", multiple=True, help="Run parameter KEY=VALUE (repeatable).")
@click.option(
    "--request-id", default="", help="Idempotency key: resubmitting returns the first run."
)
@click.pass_context
def submit(ctx, file, wait_, param, request_id):
    """Submit the workflow in FILE (YAML); print the run id.

    With --wait, follow it, print what its final tasks printed and the stderr tail of each
    failed task, and exit non-zero unless it succeeded.
    """
    wf = load_workflow(file)
    client = _client(ctx)
    run = client.submit(wf, params=key_values(param, "--param"), request_id=request_id)
    console.print(
        f"run [bold]{run.id}[/]" + (" (existing)" if run.existing else ""), highlight=False
    )
    _print_trace(client.get_run(run.id).traceparent)
    if not wait_:
        return
    final = follow_run(client, run.id)
    print_results(final)
    if final.state != t.RunState.RUN_STATE_SUCCEEDED:
        sys.exit(1)


@cli.command()
@click.argument("run_id", required=False)
@output_option(json_flag=True)
@click.option(
    "--limit", type=click.IntRange(min=0), default=50, show_default=True, help="Most runs listed."
)
@click.pass_context
def status(ctx, run_id, output, as_json, limit):
    """Show RUN_ID with each task's state, or list recent runs.

    A run's failed tasks are followed by the end of their stderr.
    """
    fmt = resolve(output, as_json)
    client = _client(ctx)
    if run_id:
        run = client.get_run(run_id)
        emit(
            fmt,
            run,
            table=lambda wide: task_table(run, wide=wide),
            names=lambda: [tk.spec.name for tk in sorted(run.tasks, key=lambda x: x.index)],
        )
        if fmt in ("table", "wide"):
            _print_trace(run.traceparent)
            print_failures(run)
        return
    runs = list(itertools.islice(client.list_runs(), limit))
    emit(fmt, runs, table=lambda wide: _runs_table(runs, wide), names=lambda: [r.id for r in runs])


def _runs_table(runs: list[t.Run], wide: bool) -> Table:
    table = Table(title="runs")
    cols = ["run", "workflow", "state", "tasks", "created"] + (["ended", "message"] if wide else [])
    for col in cols:
        table.add_column(col, no_wrap=col == "run")
    for run in runs:
        row = [
            run.id,
            run.workflow_name,
            state_label(run.state, run=True),
            str(run.task_count),
            _when(run.created_at),
        ]
        if wide:
            row += [
                _when(run.finished_at) if run.HasField("finished_at") else "",
                escape(run.message),
            ]
        table.add_row(*row)
    return table


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts.seconds))


def _print_trace(traceparent: str) -> None:
    """The run's trace id, and its link when ``$TETHER_TRACE_URL`` is set."""
    trace_id = trace_id_of(traceparent)
    if trace_id:
        link = trace_url(trace_id)
        click.echo(f"trace {trace_id}" + (f"  {link}" if link else ""))


@cli.command("trace")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the timeline as JSON.")
@click.option(
    "--width",
    type=click.IntRange(min=0),
    default=0,
    help="Line width [default: the terminal's].",
)
@click.pass_context
def trace_cmd(ctx, run_id, as_json, width):
    """Show where RUN_ID's time went: each attempt's wait, start and run as a waterfall,
    the critical path marked, from the run's own records."""
    run = _client(ctx).get_run(run_id)
    tl = timeline(run)
    if as_json:
        click.echo(json.dumps(tl.as_dict(), indent=2))
        return
    width = width or (console.width if console.is_terminal else 120)
    click.echo(render(tl, width, trace_url(tl.trace_id)))


@cli.command()
@click.argument("run_id")
@click.option(
    "--from-revision",
    default=0,
    type=click.IntRange(0, INT64_MAX),
    help="Resume after this revision (printed with each change) instead of a snapshot.",
)
@output_option(STREAM_FORMATS)
@click.pass_context
def watch(ctx, run_id, from_revision, output):
    """Print every state change of RUN_ID until it finishes.

    If the controller goes away (a restart, say), the watch resumes from the last revision it
    printed, so no change is missed or printed twice. With -o json, each change is one JSON
    object a line (NDJSON), with its ``revision``.
    """
    for ev in _client(ctx).follow(run_id, from_revision, on_retry=_say_resuming):
        if output in ("json", "yaml"):
            emit_stream(output, _event_record(ev))
        else:
            _print_event(ev, wide=output == "wide")


def _say_resuming(err: TetherError) -> None:
    if err.code.name == "OUT_OF_RANGE":
        err_console.print("history compacted; resuming from a snapshot…", style="dim")
    else:
        err_console.print("controller unavailable; resuming…", style="dim")


def _event_record(ev) -> dict:
    """One change as data: its revision and a snapshot, a task, or the run's new state."""
    data = to_dict(ev)
    data["revision"] = ev.revision  # an int, though the proto's JSON makes int64 a string
    if not ev.HasField("snapshot") and not ev.HasField("task"):
        data["runState"] = t.RunState.Name(ev.run_state)
    return data


def _print_event(ev, wide: bool = False) -> None:
    if ev.HasField("snapshot"):
        console.print(
            f"rev {ev.revision}: run {ev.snapshot.id} {state_label(ev.snapshot.state, True)}"
        )
        for tk in ev.snapshot.tasks:
            console.print(f"  {tk.spec.name}: {state_label(tk.state)}")
    elif ev.HasField("task"):
        tk = ev.task
        detail = f": {escape(tk.message)}" if wide and tk.message else ""
        console.print(
            f"rev {ev.revision}: {tk.spec.name} {state_label(tk.state)}"
            + (f" on {tk.node} (attempt {tk.attempt})" if tk.node else "")
            + detail
        )
    else:
        console.print(f"rev {ev.revision}: run {state_label(ev.run_state, True)}")


@cli.command()
@click.argument("run_id")
@click.option("--task", default="", help="Cancel only this task (its dependents are skipped).")
@click.pass_context
def cancel(ctx, run_id, task):
    """Cancel RUN_ID (or one task of it)."""
    _client(ctx).cancel(run_id, task)
    console.print(f"cancelling {run_id}" + (f" task {task}" if task else ""))


@cli.command()
@click.argument("run_id")
@click.argument("task")
@click.option(
    "--attempt",
    type=click.IntRange(0, INT32_MAX),
    default=0,
    help="Attempt number, 1 for the first [default: the current attempt].",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the attempt ends.")
@click.option("--stdout-only", is_flag=True, help="Print only the task's stdout.")
@click.option("--stderr-only", is_flag=True, help="Print only the task's stderr.")
@output_option(("raw", "json", "yaml"))
@click.pass_context
def logs(ctx, run_id, task, attempt, follow, stdout_only, stderr_only, output):
    """Print what TASK of RUN_ID wrote: its stdout to stdout, its stderr to stderr.

    The logs come from the node that ran the attempt, which must be connected. With -o json,
    each chunk is one JSON object a line on stdout (NDJSON: stream, attempt, data as text).
    """
    if stdout_only and stderr_only:
        raise click.UsageError("--stdout-only and --stderr-only exclude each other")
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    if stdout_only:
        del sinks["stderr"]
    if stderr_only:
        del sinks["stdout"]
    chunks = _client(ctx).logs(run_id, task, attempt=attempt, follow=follow)
    try:
        for chunk in chunks:
            sink = sinks.get(chunk.stream)
            if sink is None:
                continue
            if output == "raw":
                sink.write(chunk.data)
                sink.flush()
            else:
                record = {
                    "run": run_id,
                    "task": task,
                    "attempt": chunk.attempt,
                    "stream": chunk.stream,
                    "data": chunk.data.decode("utf-8", errors="replace"),
                }
                emit_stream(output, record)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not complain about the closed pipe.
        chunks.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


@cli.group(invoke_without_command=True)
@output_option(json_flag=True)
@click.pass_context
def nodes(ctx, output, as_json):
    """List the registered nodes and their resources; cordon, uncordon or drain one."""
    if ctx.invoked_subcommand is not None:
        return
    ns = _client(ctx).nodes()
    emit(
        resolve(output, as_json),
        ns,
        table=lambda wide: _nodes_table(ns, wide),
        names=lambda: [n.name for n in ns],
    )


def _nodes_table(ns, wide: bool) -> Table:
    table = Table(title="nodes (allocated/capacity, free)")
    cols = ["node", "state", "cpu", "memory", "gpus", "running", "runtime", "labels"]
    if wide:
        cols += ["max tasks", "version", "registered", "gpu models"]
    for col in cols:
        table.add_column(col, no_wrap=col == "node")
    for n in ns:
        a, c = n.allocated, n.capacity
        free_mem = max(0, c.memory_bytes - a.memory_bytes)
        row = [
            n.name,
            n.schedule_state or "ready",
            f"{a.cpu:g}/{c.cpu:g}, {max(0.0, c.cpu - a.cpu):g} free",
            f"{format_memory(a.memory_bytes)}/{format_memory(c.memory_bytes)}, "
            f"{format_memory(free_mem)} free",
            f"{a.gpu}/{len(n.gpus)}, {max(0, len(n.gpus) - a.gpu)} free",
            str(n.running_tasks),
            n.runtime,
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
        ]
        if wide:
            row += [
                str(n.max_tasks or ""),
                n.agent_version,
                _when(n.registered_at),
                ",".join(g.model for g in n.gpus),
            ]
        table.add_row(*row)
    return table


cli.add_command(certs_group)
add_secrets_commands(cli, _client)
cli.add_command(acl)
cli.add_command(tokens)


@nodes.command("cordon")
@click.argument("node")
@click.pass_context
def nodes_cordon(ctx, node):
    """No new placements on NODE (running attempts go on)."""
    _client(ctx).cordon_node(node)
    click.echo(f"node {node} cordoned")


@nodes.command("uncordon")
@click.argument("node")
@click.pass_context
def nodes_uncordon(ctx, node):
    """Place work on NODE again (ends a cordon or a drain)."""
    _client(ctx).uncordon_node(node)
    click.echo(f"node {node} uncordoned")


@nodes.command("drain")
@click.argument("node")
@click.option(
    "--deadline",
    default="10m",
    show_default=True,
    help="How long running attempts may take to finish; then they are retried elsewhere.",
)
@click.pass_context
def nodes_drain(ctx, node, deadline):
    """Cordon NODE, let its attempts finish, stop what remains at the deadline."""
    try:
        seconds = parse_duration(deadline)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--deadline") from None
    _client(ctx).drain_node(node, seconds)
    click.echo(f"node {node} draining (deadline {deadline})")


def main() -> None:
    """Entry point: run the CLI; errors print one line and exit non-zero."""
    try:
        cli.main(standalone_mode=False, prog_name="tether")
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TetherError as e:
        # Before OSError, which the SDK's TimeoutError is too (a built-in TimeoutError).
        # soft_wrap: one line however narrow the terminal, so scripts can grep it.
        err_console.print(f"error: {e.message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
