"""``tether controller``: run a controller in the foreground."""

from __future__ import annotations

import asyncio
import signal

import click

from tether.controller.config import ControllerConfig, is_loopback
from tether.controller.errors import StoreUnavailable
from tether.controller.etcd_options import etcd_options
from tether.controller.limit_options import limit_options, limits_from_flags
from tether.controller.policies import DEFAULT_POLICY, POLICIES
from tether.controller.secretbox import KeyFileError
from tether.controller.server import ControllerServer
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.quantities import parse_duration
from tether.sdk.telemetry import setup_logging


async def serve(config: ControllerConfig) -> None:
    """Run a controller until SIGINT or SIGTERM, then shut it down in order."""
    server = ControllerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    await server.wait()


@click.command("controller")
@click.option(
    "--etcd",
    envvar="TETHER_ETCD",
    default="127.0.0.1:2379",
    show_default=True,
    help="etcd endpoints, comma-separated: host:port, http:// or https:// URLs (env TETHER_ETCD).",
)
@etcd_options
@click.option(
    "--prefix",
    envvar="TETHER_PREFIX",
    default="/tether",
    show_default=True,
    help="Key prefix of all records (env TETHER_PREFIX).",
)
@click.option(
    "--listen",
    envvar="TETHER_LISTEN",
    default=DEFAULT_CONTROLLER,
    show_default=True,
    help="gRPC listen address (env TETHER_LISTEN).",
)
@click.option(
    "--lease-ttl",
    envvar="TETHER_LEASE_TTL",
    default=10,
    show_default=True,
    type=int,
    help="Seconds a silent node stays registered (env TETHER_LEASE_TTL).",
)
@click.option(
    "--cancel-grace",
    envvar="TETHER_CANCEL_GRACE",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds from SIGTERM to SIGKILL on cancel.",
)
@click.option(
    "--metrics-listen",
    envvar="TETHER_METRICS_LISTEN",
    default="",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (env TETHER_METRICS_LISTEN).",
)
@click.option(
    "--retention",
    envvar="TETHER_RETENTION",
    default="0s",
    show_default=True,
    help="Delete finished runs this long after they end, e.g. 7d (0 keeps them).",
)
@click.option(
    "--policy",
    envvar="TETHER_POLICY",
    default=DEFAULT_POLICY,
    show_default=True,
    type=click.Choice(sorted(POLICIES)),
    help="Placement policy for workflows that name none (scheduling.policy) (env TETHER_POLICY).",
)
@click.option(
    "--priority-aging",
    envvar="TETHER_PRIORITY_AGING",
    default="30s",
    show_default=True,
    help="A ready task gains one priority point per this much waiting, so low priorities "
    "are never starved (0 turns aging off) (env TETHER_PRIORITY_AGING).",
)
@click.option(
    "--tls-cert",
    envvar="TETHER_TLS_CERT",
    default="",
    help="Server certificate (PEM, from 'tether certs issue controller'); serves TLS.",
)
@click.option("--tls-key", envvar="TETHER_TLS_KEY", default="", help="Its key (PEM).")
@click.option(
    "--tls-ca",
    envvar="TETHER_TLS_CA",
    default="",
    help="CA of the node certificates agents must present (PEM).",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="TETHER_INSECURE",
    help="Serve plaintext on a non-loopback address (anyone reaching it can run commands).",
)
@click.option(
    "--secrets-key-file",
    envvar="TETHER_SECRETS_KEY_FILE",
    default="",
    help="File with the 32-byte key (raw or base64) that encrypts secrets in etcd; "
    "without it secrets are off (env TETHER_SECRETS_KEY_FILE).",
)
@click.option(
    "--auth",
    envvar="TETHER_AUTH",
    is_flag=True,
    help="Require bearer tokens without TLS too (with TLS they are always required).",
)
@click.option(
    "--rate-limit",
    envvar="TETHER_RATE_LIMIT",
    default=50.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Requests per second each token may make on average (0: unlimited).",
)
@click.option(
    "--rate-burst",
    envvar="TETHER_RATE_BURST",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests a token may make at once before --rate-limit applies.",
)
@click.option(
    "--advertise",
    envvar="TETHER_ADVERTISE",
    default="",
    help="host:port where clients and agents reach this controller; standbys send callers "
    "there when it leads (default: from --listen, this host's name for 0.0.0.0).",
)
@click.option(
    "--leader-ttl",
    envvar="TETHER_LEADER_TTL",
    default=3,
    show_default=True,
    type=int,
    help="Seconds a dead leader keeps standbys waiting (env TETHER_LEADER_TTL).",
)
@click.option("--log-level", envvar="TETHER_LOG_LEVEL", default="info", show_default=True)
@limit_options
def controller_command(
    etcd,
    prefix,
    listen,
    lease_ttl,
    cancel_grace,
    metrics_listen,
    retention,
    policy,
    priority_aging,
    tls_cert,
    tls_key,
    tls_ca,
    insecure,
    secrets_key_file,
    auth,
    rate_limit,
    rate_burst,
    advertise,
    leader_ttl,
    log_level,
    **flags,
):
    """Run a controller (state in etcd, gRPC API for clients and agents)."""
    setup_logging(log_level)
    try:
        config = ControllerConfig(
            etcd_endpoints=tuple(e.strip() for e in etcd.split(",") if e.strip()),
            prefix=prefix,
            listen=listen,
            lease_ttl=lease_ttl,
            cancel_grace=cancel_grace,
            metrics_listen=metrics_listen,
            retention=parse_duration(retention),
            policy=policy,
            priority_aging=parse_duration(priority_aging),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            insecure=insecure,
            **{k: v for k, v in flags.items() if k.startswith("etcd_")},
            **limits_from_flags(flags),
            secrets_key_file=secrets_key_file,
            auth=auth,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            advertise=advertise,
            leader_ttl=leader_ttl,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
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
        raise click.ClickException(f"{e} (is etcd running at {etcd}?)") from None
    except (OSError, RuntimeError) as e:  # e.g. the listen address is taken
        raise click.ClickException(f"cannot serve on {listen}: {e}") from None
