"""``tether certs``: a CA and the certificates of a mesh's controllers and nodes."""

from __future__ import annotations

from pathlib import Path

import click

from tether.sdk import certs

__all__ = ["certs_group"]

_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory of the CA (ca.pem, ca-key.pem) and of the files issued.",
)
# `issue` takes --dir before the kind (as documented) or after it.
_ISSUE_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of the CA and of the files issued.",
)
_DAYS = click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)


@click.group("certs")
def certs_group() -> None:
    """Create a CA and issue controller and node certificates (keys are written 0600)."""


@certs_group.command("init")
@_DIR
@click.option("--force", is_flag=True, help="Replace an existing CA (its certs stop working).")
def init_command(directory: Path, force: bool) -> None:
    """Create the CA: DIR/ca.pem and DIR/ca-key.pem."""
    try:
        issued = certs.init_ca(directory, force=force)
    except certs.CertError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {issued.cert} and {issued.key}")


@certs_group.group("issue")
@_ISSUE_DIR
@click.pass_context
def issue_group(ctx: click.Context, directory: Path | None) -> None:
    """Issue a certificate signed by the CA in --dir."""
    ctx.obj = {**(ctx.obj or {}), "certs_dir": directory}


def _dir(directory: Path | None) -> Path:
    directory = directory or (click.get_current_context().obj or {}).get("certs_dir")
    if directory is None:
        raise click.UsageError("give --dir, the CA's directory")
    return directory


@issue_group.command("controller")
@_ISSUE_DIR
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="A name or IP clients and agents dial (repeatable); IPs become IP SANs.",
)
@_DAYS
def issue_controller_command(directory: Path | None, hosts: tuple[str, ...], days: int) -> None:
    """Write DIR/controller.pem and DIR/controller-key.pem."""
    try:
        issued = certs.issue_controller(_dir(directory), list(hosts), days=days)
    except certs.CertError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {issued.cert} and {issued.key}")


@issue_group.command("node")
@_ISSUE_DIR
@click.argument("name")
@_DAYS
def issue_node_command(directory: Path | None, name: str, days: int) -> None:
    """Write DIR/node-NAME.pem and DIR/node-NAME-key.pem: node NAME's identity."""
    try:
        issued = certs.issue_node(_dir(directory), name, days=days)
    except certs.CertError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {issued.cert} and {issued.key}")
