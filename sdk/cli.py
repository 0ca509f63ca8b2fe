"""The ``tether`` command.

Client subcommands live here; ``controller``, ``agent`` and ``dev`` are contributed by their
packages through the ``tether.commands`` entry-point group and imported only when run, so a
client-only install has a working ``tether``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib.metadata import entry_points

import click
from rich.table import Table

from tether.api.v1 import types_pb2 as t
from tether.sdk.acl_cli import acl, tokens
from tether.sdk.certs_cli import certs_group
from tether.sdk.cli_secrets import add_secrets_commands
from tether.sdk.client import Client
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.errors import TetherError
from tether.sdk.quantities import format_memory, parse_duration
from tether.sdk.spec import load_workflow
from tether.sdk.states import TERMINAL_RUN_STATES
from tether.sdk.terminal import (
    console,
    err_console,
    follow_run,
    key_values,
    print_results,
    state_label,
    task_table,
)


class _LazyGroup(click.Group):
    """Adds the subcommands other packages contribute, importing them only when invoked."""

    def _contributed(self):
        return {ep.name: ep for ep in entry_points(group="tether.commands")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._contributed()))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None:
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


@click.group(cls=_LazyGroup)
@click.option(
    "--controller",
    envvar="TETHER_CONTROLLER",
    default=DEFAULT_CONTROLLER,
    show_default=True,
    help="Controller address (env TETHER_CONTROLLER).",
)
@click.option(
    "--tls-ca",
    envvar="TETHER_TLS_CA",
    default="",
    help="CA of the controller's certificate (PEM); connects over TLS (env TETHER_TLS_CA).",
)
@click.option(
    "--token",
    envvar="TETHER_TOKEN",
    default="",
    help="Bearer token for controllers with auth (env TETHER_TOKEN).",
)
@click.pass_context
def cli(ctx: click.Context, controller: str, tls_ca: str, token: str) -> None:
    """Tether: run AI workflows (DAGs of tasks) on your own nodes."""
    # Subcommands from other modules build their client with the same function.
    ctx.obj = {"controller": controller, "tls_ca": tls_ca, "token": token, "make_client": _client}


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["controller"], tls_ca=ctx.obj["tls_ca"], token=ctx.obj["token"])


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", "wait_", is_flag=True, help="Follow the run live until it finishes.")
@click.option("--param", "-p", multiple=True, help="Run parameter KEY=VALUE (repeatable).")
@click.option(
    "--request-id", default="", help="Idempotency key: resubmitting returns the first run."
)
@click.pass_context
def submit(ctx, file, wait_, param, request_id):
    """Submit the workflow in FILE (YAML); print the run id."""
    wf = load_workflow(file)
    client = _client(ctx)
    run = client.submit(wf, params=key_values(param, "--param"), request_id=request_id)
    console.print(
        f"run [bold]{run.id}[/]" + (" (existing)" if run.existing else ""), highlight=False
    )
    if not wait_:
        return
    final = follow_run(client, run.id)
    print_results(final)
    if final.state != t.RunState.RUN_STATE_SUCCEEDED:
        sys.exit(1)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.pass_context
def status(ctx, run_id, as_json):
    """Show RUN_ID with each task's state, or list recent runs."""
    client = _client(ctx)
    if run_id:
        run = client.get_run(run_id)
        if as_json:
            from google.protobuf.json_format import MessageToJson

            click.echo(MessageToJson(run))
            return
        console.print(task_table(run))
        return
    table = Table(title="runs")
    for col in ("run", "workflow", "state", "tasks", "created"):
        table.add_column(col)
    for i, run in enumerate(client.list_runs()):
        if i >= 50:
            break
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created_at.seconds))
        table.add_row(
            run.id,
            run.workflow_name,
            state_label(run.state, run=True),
            str(run.task_count),
            created,
        )
    console.print(table)


@cli.command()
@click.argument("run_id")
@click.option(
    "--from-revision",
    default=0,
    type=int,
    help="Resume after this revision (printed with each change) instead of a snapshot.",
)
@click.pass_context
def watch(ctx, run_id, from_revision):
    """Print every state change of RUN_ID until it finishes.

    If the controller goes away (a restart, say), the watch resumes from the last revision it
    printed, so no change is missed or printed twice.
    """
    client = _client(ctx)
    revision = from_revision
    while True:
        try:
            for ev in client.watch(run_id, revision):
                revision = max(revision, ev.revision)
                _print_event(ev)
                state = ev.snapshot.state if ev.HasField("snapshot") else ev.run_state
                if state in TERMINAL_RUN_STATES and not ev.HasField("task"):
                    return
        except TetherError as e:
            if e.code.name != "UNAVAILABLE":
                raise
            err_console.print("controller unavailable; resuming…", style="dim")
            time.sleep(1.0)


def _print_event(ev) -> None:
    if ev.HasField("snapshot"):
        console.print(
            f"rev {ev.revision}: run {ev.snapshot.id} {state_label(ev.snapshot.state, True)}"
        )
        for tk in ev.snapshot.tasks:
            console.print(f"  {tk.spec.name}: {state_label(tk.state)}")
    elif ev.HasField("task"):
        tk = ev.task
        console.print(
            f"rev {ev.revision}: {tk.spec.name} {state_label(tk.state)}"
            + (f" on {tk.node} (attempt {tk.attempt})" if tk.node else "")
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
    type=click.IntRange(min=0),
    default=0,
    help="Attempt number, 1 for the first [default: the current attempt].",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the attempt ends.")
@click.option("--stdout-only", is_flag=True, help="Print only the task's stdout.")
@click.option("--stderr-only", is_flag=True, help="Print only the task's stderr.")
@click.pass_context
def logs(ctx, run_id, task, attempt, follow, stdout_only, stderr_only):
    """Print what TASK of RUN_ID wrote: its stdout to stdout, its stderr to stderr.

    The logs come from the node that ran the attempt, which must be connected.
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
            if sink is not None:
                sink.write(chunk.data)
                sink.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not complain about the closed pipe.
        chunks.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print nodes as JSON.")
@click.pass_context
def nodes(ctx, as_json):
    """List the registered nodes and their resources; cordon, uncordon or drain one."""
    if ctx.invoked_subcommand is not None:
        return
    ns = _client(ctx).nodes()
    if as_json:
        from google.protobuf.json_format import MessageToDict

        click.echo(json.dumps([MessageToDict(n) for n in ns], indent=2))
        return
    table = Table(title="nodes (allocated/capacity, free)")
    for col in ("node", "state", "cpu", "memory", "gpus", "running", "runtime", "labels"):
        table.add_column(col)
    for n in ns:
        a, c = n.allocated, n.capacity
        free_mem = max(0, c.memory_bytes - a.memory_bytes)
        table.add_row(
            n.name,
            n.schedule_state or "ready",
            f"{a.cpu:g}/{c.cpu:g}, {max(0.0, c.cpu - a.cpu):g} free",
            f"{format_memory(a.memory_bytes)}/{format_memory(c.memory_bytes)}, "
            f"{format_memory(free_mem)} free",
            f"{a.gpu}/{len(n.gpus)}, {max(0, len(n.gpus) - a.gpu)} free",
            str(n.running_tasks),
            n.runtime,
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
        )
    console.print(table)


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
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TetherError as e:
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
