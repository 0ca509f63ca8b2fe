"""``tether secrets``: set, list and delete the secrets tasks refer to in their ``env``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click
import yaml

from tether.sdk.cli_output import output_option
from tether.sdk.terminal import console

__all__ = ["add_secrets_commands", "secrets"]

# Set by add_secrets_commands: the CLI's one way to build a client from its options.
_make_client: Callable[[click.Context], object] | None = None


def add_secrets_commands(group: click.Group, make_client: Callable[[click.Context], object]):
    """Add ``secrets`` to ``group``; its commands build clients with ``make_client``."""
    global _make_client
    _make_client = make_client
    group.add_command(secrets)


def _client(ctx: click.Context):
    assert _make_client is not None, "add_secrets_commands was not called"
    return _make_client(ctx)


def _read_value() -> bytes:
    if sys.stdin.isatty():
        return click.prompt("value", hide_input=True, err=True).encode()
    data = sys.stdin.buffer.read()
    # `echo value | tether secrets set NAME` should not store echo's newline.
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


@click.group()
def secrets() -> None:
    """Secrets: values kept encrypted by the controller, given to tasks as env variables.

    A task refers to one as `env: {API_KEY: {secret: NAME}}`. Needs the admin role.
    """


@secrets.command("set")
@click.argument("name")
@click.pass_context
def set_secret(ctx, name):
    """Create or replace secret NAME with the value read from stdin (one final newline is
    dropped); prompts without echo on a terminal."""
    replaced = _client(ctx).set_secret(name, _read_value())
    console.print(f"secret {name} {'replaced' if replaced else 'created'}", highlight=False)


@secrets.command("list")
@output_option(("name", "json", "yaml"))
@click.pass_context
def list_secrets(ctx, output):
    """List the secrets' names (never their values), one a line."""
    names = _client(ctx).list_secrets()
    if output == "json":
        click.echo(json.dumps(names, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(names), nl=False)
    else:
        for name in names:
            click.echo(name)


@secrets.command("delete")
@click.argument("name")
@click.pass_context
def delete_secret(ctx, name):
    """Delete secret NAME."""
    _client(ctx).delete_secret(name)
    console.print(f"secret {name} deleted", highlight=False)
