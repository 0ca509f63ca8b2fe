"""What the deployment tests share: finding an outside tool, and checking that the command
lines and ``TETHER_*`` variables written in deploy/ are ones the ``tether`` commands take."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import pytest

from tether.agent.cli import agent_command
from tether.controller.cli import controller_command

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# The server commands that deploy/ runs, by their subcommand name.
COMMANDS: dict[str, click.Command] = {"controller": controller_command, "agent": agent_command}

# Read outside the commands' options: logging set-up, and the health probe.
OTHER_VARIABLES = frozenset(
    {
        "TETHER_LOG_FORMAT",
        "TETHER_HEALTH_ADDRESS",
        "TETHER_HEALTH_TLS_CA",
        "TETHER_HEALTH_SERVER_NAME",
    }
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """Skip with ``reason``; under CI fail instead, since .ci/run installs the tools."""
    if in_ci():
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def require_tool(name: str, why: str) -> str:
    """The path of the executable ``name``, or skip (fail under CI) saying ``why`` it is needed."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed: {why}")
    return path


def compose_command() -> list[str]:
    """``docker compose`` (the v2 plugin) or Debian's ``docker-compose``, whichever exists."""
    docker = shutil.which("docker")
    if docker:
        res = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if res.returncode == 0:
            return [docker, "compose"]
    return [require_tool("docker-compose", "it validates deploy/docker-compose.yml")]


def has_option(command: str, flag: str) -> bool:
    return any(flag in p.opts for p in COMMANDS[command].params)


def parse_command_line(argv: Sequence[str]) -> dict:
    """Parse ``tether`` arguments (``[controller|agent, flags…]``) as the command would.

    Returns the parsed parameters; raises ``click.UsageError`` for an unknown flag or a bad
    value, exactly where the real command would refuse to start.
    """
    name, *args = argv
    assert name in COMMANDS, f"{name!r} is not a server subcommand ({', '.join(COMMANDS)})"
    with COMMANDS[name].make_context(name, list(args)) as ctx:
        return dict(ctx.params)


def variables_of(command: str) -> set[str]:
    """The environment variables a server command reads: its config's settings (see
    :mod:`tether.sdk.settings`) and any option click reads from the environment itself."""
    from tether.agent.config import AgentConfig
    from tether.controller.config import ControllerConfig
    from tether.sdk.settings import settings_of

    config = {"controller": ControllerConfig, "agent": AgentConfig}[command]
    names: set[str] = {s.env for s in settings_of(config) if s.env}
    for p in COMMANDS[command].params:
        envvar = p.envvar
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def unknown_variables(names: set[str], *commands: str) -> set[str]:
    """The ``TETHER_*`` names in ``names`` that none of ``commands`` (nor logging) reads."""
    known = set(OTHER_VARIABLES)
    for c in commands:
        known |= variables_of(c)
    return {n for n in names if n.startswith("TETHER_") and n not in known}


# Runs each command line as `tether` would, up to the point where it has built its one config
# object: serve()/run_agent() are replaced by a capture, so nothing listens or connects. In a
# subprocess, because the commands set up process-wide logging.
_CONFIGS = r"""
import asyncio, dataclasses, json, os, sys

import click

from tether.agent import cli as agent_cli
from tether.controller import cli as controller_cli

captured = []


async def capture(config):
    captured.append(config)


controller_cli.serve = capture
agent_cli.run_agent = capture
commands = {"controller": controller_cli.controller_command, "agent": agent_cli.agent_command}
base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
results = []
for argv, env in json.load(sys.stdin):
    os.environ.clear()
    os.environ.update(base, **env)
    captured.clear()
    name, *args = argv
    try:
        commands[name].main(args, prog_name=f"tether {name}", standalone_mode=False)
        results.append({"config": dataclasses.asdict(captured[0])})
    except click.ClickException as e:
        results.append({"error": e.format_message()})
json.dump(results, sys.stdout, default=str)
"""


def configs_of(cases: Sequence[tuple[Sequence[str], dict[str, str]]]) -> list[dict]:
    """The config each ``(argv, environment)`` makes its command build, as a dict (values
    that are not JSON types as strings); ``{"error": message}`` where the command refuses.

    An agent's ``--metrics-listen`` is dropped while the agent has no such option (it comes
    with the metrics item): the rest of its command line is still checked.
    """
    payload = []
    for argv, env in cases:
        argv = list(argv)
        if "--metrics-listen" in argv and not has_option(argv[0], "--metrics-listen"):
            i = argv.index("--metrics-listen")
            del argv[i : i + 2]
        payload.append((argv, env))
    res = subprocess.run(
        [sys.executable, "-c", _CONFIGS],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
