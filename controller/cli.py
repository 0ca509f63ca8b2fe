"""``tether controller``: run a controller in the foreground."""

from __future__ import annotations

import asyncio
import gc
import signal

import click

from tether.controller.config import ControllerConfig, is_loopback
from tether.controller.errors import StoreUnavailable
from tether.controller.secretbox import KeyFileError
from tether.controller.server import ControllerServer
from tether.sdk.cli_globals import log_level_option
from tether.sdk.settings import ConfigError, config_options, layered
from tether.sdk.telemetry import setup_logging


async def serve(config: ControllerConfig) -> None:
    """Run a controller until SIGINT or SIGTERM, then shut it down in order."""
    server = ControllerServer(config)
    await server.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    await server.wait()


def tune_gc() -> None:
    """Collect garbage less often in a controller process. Its cache holds a record per
    task, long-lived; with CPython's default thresholds every 700 allocations start a young
    collection, and the older collections that follow sweep all of that cache again, for
    cycles that are rare (records are trees). What is there after start-up is frozen out of
    collections for good."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


@click.command("controller")
@config_options(ControllerConfig)
@log_level_option()
@click.pass_context
def controller_command(ctx: click.Context, log_level: str, **_flags) -> None:
    """Run a controller (state in etcd, gRPC API for clients and agents).

    Settings come from defaults, then --config FILE, then TETHER_* variables, then flags.
    """
    setup_logging(log_level)
    try:
        config = layered(ControllerConfig, ctx)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    listen = config.listen
    if not config.tls and not is_loopback(listen):
        click.secho(
            f"WARNING: serving plaintext on {listen} (--insecure): anyone who reaches this "
            "port can run commands on every node",
            err=True,
            fg="red",
            bold=True,
        )
    try:
        asyncio.run(serve(config))
    except KeyFileError as e:
        raise click.ClickException(f"--secrets-key-file: {e}") from None
    except StoreUnavailable as e:
        etcd = ",".join(config.etcd_endpoints)
        raise click.ClickException(f"{e} (is etcd running at {etcd}?)") from None
    except (OSError, RuntimeError) as e:  # e.g. the listen address is taken
        message = str(e)
        if not message.startswith("metrics_listen"):  # which names its own address
            message = f"cannot serve on {listen}: {message}"
        raise click.ClickException(message) from None
