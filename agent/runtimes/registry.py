"""The one list of runtimes: name, what each can do, and how to build it.

The agent, the configuration's validation and the CLI's ``--runtime`` choices all read this
table, so a runtime is named in one place. Runtime modules are imported only when a runtime
is built: ``docker`` needs the optional ``docker`` package, which importing this module
must not require.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["DEFAULT", "RUNTIMES", "RuntimeInfo", "get", "names", "recovering_names"]


@dataclass(frozen=True)
class RuntimeInfo:
    """One runtime and its capabilities.

    Attributes:
        name: What ``--runtime`` and ``AgentConfig.runtime`` call it.
        target: ``module:Class`` of the runtime, imported on first use.
        takes_config: The class is built with the ``AgentConfig`` (else with no arguments).
        recovers: Work outlives the agent: a restarted agent recovers it, and the agent can
            leave it running on shutdown (``leave_running``).
        description: One line for help texts.
    """

    name: str
    target: str
    takes_config: bool = False
    recovers: bool = False
    description: str = ""

    def load(self) -> type:
        """Import and return the runtime class."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


RUNTIMES: dict[str, RuntimeInfo] = {
    info.name: info
    for info in (
        RuntimeInfo(
            "process",
            "tether.agent.runtimes.process:ProcessRuntime",
            takes_config=True,
            recovers=True,
            description="subprocesses of the agent",
        ),
        RuntimeInfo(
            "docker",
            "tether.agent.runtimes.docker:DockerRuntime",
            takes_config=True,
            recovers=True,
            description="containers through the Docker Engine API",
        ),
    )
}

DEFAULT = "process"


def names() -> list[str]:
    """Every runtime name, the default first."""
    return list(RUNTIMES)


def recovering_names() -> list[str]:
    """The runtimes whose work outlives the agent (``leave_running`` is allowed)."""
    return [n for n, info in RUNTIMES.items() if info.recovers]


def _quoted(items: list[str]) -> str:
    quoted = [repr(n) for n in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def get(name: str) -> RuntimeInfo:
    """The runtime called ``name``.

    Raises:
        ValueError: No runtime has that name.
    """
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"runtime: must be {_quoted(names())}, got {name!r}") from None
