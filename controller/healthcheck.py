"""A one-shot health probe for containers: ``python -m tether.controller.healthcheck``.

It asks a controller's gRPC health service (``grpc.health.v1.Health/Check``) whether it is
SERVING, or fetches an HTTP URL such as an agent's ``/metrics``, and exits 0 if so and 1
otherwise, with one line saying why: the contract of Docker's ``HEALTHCHECK`` and of a
Kubernetes ``exec`` probe. Kubernetes' own ``grpc`` probe speaks no TLS; this one does.

The empty service name (the default) is SERVING whenever the process serves, leader or
standby: a standby is healthy, it forwards callers to the leader. A service name such as
``tether.v1.ControllerService`` is SERVING only on the leader.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.sdk.address import check_address

__all__ = ["Unhealthy", "check", "main"]

DEFAULT_ADDRESS = "127.0.0.1:7070"


class Unhealthy(Exception):
    """The probed endpoint did not answer as healthy; the message says what it answered."""


def _check_grpc(address: str, service: str, timeout: float, tls_ca: str, server_name: str) -> None:
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if tls_ca:
        try:
            ca = Path(tls_ca).read_bytes()
        except OSError as e:
            raise Unhealthy(f"--tls-ca: cannot read {tls_ca}: {e.strerror}") from None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options)
    else:
        channel = grpc.insecure_channel(address, options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise Unhealthy(f"{address}: {e.code().name}: {e.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(f"{address}: {service or 'server'} is {status}")


def _check_http(url: str, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            reply.read(1)
    except urllib.error.HTTPError as e:
        raise Unhealthy(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Unhealthy(f"{url}: {getattr(e, 'reason', e)}") from None


def check(
    address: str = DEFAULT_ADDRESS,
    *,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: str = "",
    server_name: str = "",
) -> None:
    """Probe ``address`` once; return if it is healthy, else raise :class:`Unhealthy`.

    Args:
        address: ``host:port`` of a gRPC health service, or an ``http://`` / ``https://``
            URL that must answer 2xx.
        service: gRPC service name to ask about; empty asks about the whole server.
        timeout: Seconds to wait for the answer.
        tls_ca: PEM CA file the server's certificate must chain to; set, the probe speaks
            TLS (gRPC only).
        server_name: Name to check the server's certificate for, when ``address`` is not
            one of its names (for example ``127.0.0.1`` inside the controller's container).
    """
    if address.startswith(("http://", "https://")):
        _check_http(address, timeout)
        return
    try:
        check_address(address, "address")  # no port is an error, not a try of 443
    except ValueError as e:
        raise Unhealthy(str(e)) from None
    _check_grpc(address, service, timeout, tls_ca, server_name)


@click.command("healthcheck")
@click.argument("address", envvar="TETHER_HEALTH_ADDRESS", default=DEFAULT_ADDRESS)
@click.option("--service", default="", help="gRPC service to ask about [default: the server].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True)
@click.option(
    "--tls-ca",
    envvar="TETHER_HEALTH_TLS_CA",
    default="",
    help="CA of the server's certificate (PEM); speaks TLS (env TETHER_HEALTH_TLS_CA).",
)
@click.option(
    "--server-name",
    envvar="TETHER_HEALTH_SERVER_NAME",
    default="",
    help="Name the certificate must carry, if not ADDRESS's host (env TETHER_HEALTH_SERVER_NAME).",
)
def main(address: str, service: str, timeout: float, tls_ca: str, server_name: str) -> None:
    """Exit 0 if ADDRESS (host:port of a gRPC health service, or an http:// URL) is healthy.

    ADDRESS defaults to TETHER_HEALTH_ADDRESS, else 127.0.0.1:7070.
    """
    try:
        check(address, service=service, timeout=timeout, tls_ca=tls_ca, server_name=server_name)
    except Unhealthy as e:
        click.echo(f"unhealthy: {e}", err=True)
        sys.exit(1)
    click.echo(f"healthy: {address}")


if __name__ == "__main__":
    main()
