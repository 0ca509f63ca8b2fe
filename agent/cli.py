"""``tether agent``: run a node's agent in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from pathlib import Path

import click

from tether.agent.agent import Agent, AgentRefused
from tether.agent.config import AgentConfig, default_node_name
from tether.agent.identity import WorkDirBusy
from tether.sdk.certs import CertError, node_name_of
from tether.sdk.cli_globals import log_level_option
from tether.sdk.settings import ConfigError, config_options, layered
from tether.sdk.telemetry import setup_logging


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
    # An ignored SIGCHLD (inherited across exec) has the kernel reap tasks itself, and
    # their exit codes are lost: the agent waits for its children.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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


def _derived_defaults(kwargs: dict) -> None:
    """Defaults that depend on other settings: the node from its certificate, the work dir
    from the node."""
    if "node" not in kwargs and kwargs.get("tls_cert"):
        try:
            kwargs["node"] = node_name_of(Path(kwargs["tls_cert"]).read_bytes())
        except (OSError, CertError) as e:
            raise ConfigError(f"tls_cert: {e}") from None
    if "work_dir" not in kwargs:
        node = kwargs.get("node") or default_node_name()
        kwargs["work_dir"] = Path(tempfile.gettempdir()) / f"tether-agent-{node}"


@click.command("agent")
@config_options(AgentConfig)
@log_level_option()
@click.pass_context
def agent_command(ctx: click.Context, log_level: str, **_flags) -> None:
    """Run an agent: register this node and run the tasks the controller assigns.

    Settings come from defaults, then --config FILE, then TETHER_* variables, then flags.
    """
    setup_logging(log_level)
    try:
        config = layered(AgentConfig, ctx, derive=_derived_defaults)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    asyncio.run(run_agent(config))
