"""``tether agent``: run a node's agent in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from tether.agent.agent import Agent, AgentRefused
from tether.agent.config import AgentConfig, default_node_name
from tether.agent.identity import WorkDirBusy
from tether.agent.runtimes import registry
from tether.sdk.certs import CertError, node_name_of
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.quantities import parse_duration, parse_memory
from tether.sdk.telemetry import setup_logging
from tether.sdk.terminal import key_values


async def _until_signal(stopping: asyncio.Event, *aws: asyncio.Future) -> bool:
    """Wait for a signal or for the first of ``aws``; True if it was the signal."""
    stopping.clear()
    waiter = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({waiter, *aws}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    return stopping.is_set()


async def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGINT or SIGTERM.

    The first signal drains the node (``config.drain_grace``; see :meth:`Agent.drain`), a
    second one, or the end of the drain, stops what still runs and exits.
    """
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    runner = asyncio.create_task(agent.run())
    signalled = await _until_signal(stopping, runner)
    if signalled and config.drain_grace > 0 and not config.leave_running:
        drain = asyncio.create_task(agent.drain())
        if await _until_signal(stopping, drain, runner):
            click.echo("tether agent: second signal; stopping attempts now", err=True)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    await agent.stop()  # stops running attempts: SIGTERM, then SIGKILL after the grace
    if runner.done() and runner.exception() is not None:
        exc = runner.exception()
        if isinstance(exc, AgentRefused | WorkDirBusy):
            raise click.ClickException(str(exc))
        raise exc
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner


@click.command("agent")
@click.option(
    "--controller",
    "controller_addr",
    envvar="TETHER_CONTROLLER",
    default=DEFAULT_CONTROLLER,
    show_default=True,
    help="Controller address.",
)
@click.option(
    "--name",
    envvar="TETHER_NODE",
    default=default_node_name,
    show_default="the certificate's node, else the hostname",
    help="Node name (env TETHER_NODE); with --tls-cert it must be the certificate's node.",
)
@click.option("--label", multiple=True, help="Node label KEY=VALUE (repeatable).")
@click.option(
    "--address",
    default="",
    envvar="TETHER_ADDRESS",
    help="Host or IP other nodes reach this node at (a gang's TETHER_MASTER_ADDR); "
    "default: this host's name (env TETHER_ADDRESS).",
)
@click.option(
    "--runtime",
    type=click.Choice(registry.names()),
    default=registry.DEFAULT,
    show_default=True,
    envvar="TETHER_RUNTIME",
    help="How tasks run.",
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    envvar="TETHER_WORK_DIR",
    default=None,
    help="Attempt files and logs [default: $TMPDIR/tether-agent-NAME].",
)
@click.option("--cpu", type=float, default=0.0, help="Cores offered [default: detected].")
@click.option("--memory", default="0", help="Memory offered, e.g. 8Gi [default: detected].")
@click.option(
    "--max-tasks", type=int, default=0, help="Most attempts at once [default: 2 per core]."
)
@click.option(
    "--log-limit",
    envvar="TETHER_LOG_LIMIT",
    default="64Mi",
    show_default=True,
    help="Most bytes kept of each attempt's stdout and of its stderr, e.g. 1Gi; 0: no limit.",
)
@click.option("--docker-host", envvar="DOCKER_HOST", default="", help="Docker/Podman socket.")
@click.option(
    "--leave-running",
    is_flag=True,
    envvar="TETHER_LEAVE_RUNNING",
    help="On exit, leave containers running for the next agent on this node to adopt.",
)
@click.option(
    "--tls-cert",
    envvar="TETHER_TLS_CERT",
    default="",
    help="This node's certificate (PEM, from 'tether certs issue node NAME').",
)
@click.option("--tls-key", envvar="TETHER_TLS_KEY", default="", help="Its key (PEM).")
@click.option(
    "--tls-ca",
    envvar="TETHER_TLS_CA",
    default="",
    help="CA of the controller's certificate (PEM); connects over TLS.",
)
@click.option(
    "--disconnect-grace",
    envvar="TETHER_DISCONNECT_GRACE",
    default="0s",
    show_default="the lease TTL",
    help="How long to keep attempts running without reaching a controller, e.g. 30s.",
)
@click.option(
    "--drain-grace",
    envvar="TETHER_DRAIN_GRACE",
    default="20s",
    show_default=True,
    help="On SIGTERM, how long running attempts may finish before they are stopped and "
    "retried elsewhere (no new ones are placed here meanwhile); 0s: stop them at once.",
)
@click.option("--log-level", envvar="TETHER_LOG_LEVEL", default="info", show_default=True)
@click.pass_context
def agent_command(
    ctx,
    controller_addr,
    name,
    label,
    address,
    runtime,
    work_dir,
    cpu,
    memory,
    max_tasks,
    log_limit,
    docker_host,
    leave_running,
    tls_cert,
    tls_key,
    tls_ca,
    disconnect_grace,
    drain_grace,
    log_level,
):
    """Run an agent: register this node and run the tasks the controller assigns."""
    setup_logging(log_level)
    if tls_cert and ctx.get_parameter_source("name") == click.core.ParameterSource.DEFAULT:
        try:
            name = node_name_of(Path(tls_cert).read_bytes())
        except (OSError, CertError) as e:
            raise click.BadParameter(str(e), param_hint="--tls-cert") from None
    try:
        kw = {}
        if work_dir is not None:
            kw["work_dir"] = work_dir
        else:
            import tempfile

            kw["work_dir"] = Path(tempfile.gettempdir()) / f"tether-agent-{name}"
        config = AgentConfig(
            controller=controller_addr,
            node=name,
            labels=key_values(label, "--label"),
            address=address,
            runtime=runtime,
            cpu=cpu,
            memory_bytes=parse_memory(memory),
            max_tasks=max_tasks,
            log_limit_bytes=parse_memory(log_limit),
            docker_host=docker_host,
            leave_running=leave_running,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            disconnect_grace=parse_duration(disconnect_grace),
            drain_grace=parse_duration(drain_grace),
            **kw,
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    asyncio.run(run_agent(config))
