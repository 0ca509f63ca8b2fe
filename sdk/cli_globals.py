"""The options every client command takes (``--controller``, ``--tls-ca``, ``--token``).

They are declared once here and accepted before the subcommand (``tether --controller X
nodes``) or after it (``tether nodes --controller X``), as users and scripts write both.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.telemetry import LOG_LEVELS

__all__ = ["GLOBAL_OPTIONS", "add_global_options", "global_options", "log_level_option"]

# name -> (flags, environment variable, default, help)
GLOBAL_OPTIONS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "controller": (
        ("--controller",),
        "TETHER_CONTROLLER",
        DEFAULT_CONTROLLER,
        "Controller address host:port; several, comma-separated, for HA.",
    ),
    "tls_ca": (
        ("--tls-ca",),
        "TETHER_TLS_CA",
        "",
        "CA of the controller's certificate (PEM); connects over TLS.",
    ),
    "token": (("--token",), "TETHER_TOKEN", "", "Bearer token for controllers with auth."),
}


def global_options(command: Callable) -> Callable:
    """Add the options to the ``tether`` group itself, with their defaults and variables."""
    for name, (flags, env, default, help_text) in reversed(GLOBAL_OPTIONS.items()):
        command = click.option(
            *flags,
            name,
            envvar=env,
            default=default,
            show_default=bool(default),
            help=f"{help_text} (env {env})",
        )(command)
    return command


def _store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Given after the subcommand: it overrides what the group read (flag, env or default).
    if value is not None and param.name is not None:
        ctx.ensure_object(dict)[param.name] = value


def add_global_options(command: click.Command) -> None:
    """Let ``command`` (and a group's subcommands, recursively) take the options too."""
    if getattr(command, "_tether_globals", False):
        return
    command._tether_globals = True  # type: ignore[attr-defined]
    taken = {opt for p in command.params for opt in getattr(p, "opts", ())}
    for name, (flags, env, _default, help_text) in GLOBAL_OPTIONS.items():
        if taken.intersection(flags):
            continue
        command.params.append(
            click.Option(
                [*flags, name],
                default=None,
                show_default=False,
                expose_value=False,
                callback=_store,
                help=f"{help_text} (env {env}; also before the command).",
            )
        )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_global_options(sub)


def log_level_option(envvar: str | None = "TETHER_LOG_LEVEL") -> Callable:
    """The servers' ``--log-level`` (one of LOG_LEVELS; an unknown one is a usage error)."""
    return click.option(
        "--log-level",
        envvar=envvar,
        default="info",
        show_default=True,
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
    )
