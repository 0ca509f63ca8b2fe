"""``tether acl`` and ``tether tokens``: the first admin token, and the users' tokens."""

from __future__ import annotations

import time

import click
from rich.table import Table

from tether.sdk.cli_output import emit, output_option, resolve
from tether.sdk.quantities import parse_duration
from tether.sdk.terminal import console, err_console

__all__ = ["acl", "tokens"]

ROLES = ("viewer", "submitter", "operator", "admin")


def _client(ctx: click.Context):
    return ctx.obj["make_client"](ctx)  # tether.sdk.cli's, the one place clients are made


def _print_token(token: str, what: str) -> None:
    # The token alone on stdout, so `TOKEN=$(tether tokens create ...)` captures it; the note
    # goes to stderr.
    click.echo(token)
    err_console.print(f"{what}; it is shown only once: store it now.", highlight=False)


@click.group()
def acl() -> None:
    """Access control of the mesh."""


@acl.command()
@click.option("--name", default="admin", show_default=True, help="Name of the admin token.")
@click.pass_context
def bootstrap(ctx, name):
    """Create the first admin token (works once per mesh) and print it."""
    token, info = _client(ctx).bootstrap_acl(name)
    _print_token(token, f"admin token {info.name!r} created")


@click.group()
def tokens() -> None:
    """Create, list and revoke user tokens (needs an admin token)."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the token may do.")
@click.option("--ttl", default="", help="Lifetime, e.g. 30d or 12h [default: never expires].")
@click.pass_context
def create(ctx, name, role, ttl):
    """Create token NAME with ROLE and print it (shown only once)."""
    try:
        seconds = parse_duration(ttl) if ttl else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ttl") from None
    token, info = _client(ctx).create_token(name, role, seconds)
    _print_token(token, f"token {info.name!r} ({info.role}) created")


@tokens.command("list")
@output_option(json_flag=True)
@click.pass_context
def list_(ctx, output, as_json):
    """List tokens: names, roles and times (never the tokens themselves)."""
    infos = _client(ctx).list_tokens()
    emit(
        resolve(output, as_json),
        infos,
        table=lambda _wide: _tokens_table(infos),
        names=lambda: [i.name for i in infos],
    )


def _tokens_table(infos) -> Table:
    table = Table(title="tokens")
    for col in ("name", "role", "created", "expires", "created by"):
        table.add_column(col)
    for i in infos:
        table.add_row(
            i.name,
            i.role,
            _when(i.created_at.seconds),
            _when(i.expires_at.seconds) if i.HasField("expires_at") else "never",
            i.created_by,
        )
    return table


@tokens.command()
@click.argument("name")
@click.pass_context
def revoke(ctx, name):
    """Revoke token NAME: every controller refuses it from now on."""
    _client(ctx).revoke_token(name)
    console.print(f"token {name!r} revoked", highlight=False)


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
