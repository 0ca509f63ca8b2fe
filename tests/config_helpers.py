"""Build a server config the way its command does (file, environment, flags), without running it."""

from __future__ import annotations

import click
from click.testing import CliRunner

from tether.sdk.settings import config_options, layered


def build_config(cls, *args: str, env: dict[str, str] | None = None, derive=None):
    """Run a command with ``cls``'s options on ``args`` and return the config it layers.

    Raises:
        ConfigError: as the real command would report it.
    """
    built = []

    @click.command()
    @config_options(cls)
    @click.pass_context
    def command(ctx, **_):
        built.append(layered(cls, ctx, environ=env or {}, derive=derive))

    result = CliRunner().invoke(command, list(args), standalone_mode=False, catch_exceptions=True)
    if result.exception is not None:
        raise result.exception
    return built[0]


def controller_config(*args: str, env: dict[str, str] | None = None):
    """The ControllerConfig ``tether controller ARGS`` would run with."""
    from tether.controller.config import ControllerConfig

    return build_config(ControllerConfig, *args, env=env)


def agent_config(*args: str, env: dict[str, str] | None = None):
    """The AgentConfig ``tether agent ARGS`` would run with."""
    from tether.agent.cli import _derived_defaults
    from tether.agent.config import AgentConfig

    return build_config(AgentConfig, *args, env=env, derive=_derived_defaults)
