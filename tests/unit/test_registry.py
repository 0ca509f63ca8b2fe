"""The runtime registry: one list of names and capabilities, read by config, CLI and agent."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from config_helpers import agent_config

from tether.agent.agent import make_runtime
from tether.agent.cli import agent_command
from tether.agent.config import AgentConfig
from tether.agent.runtimes import registry


def test_names_and_capabilities():
    assert registry.names() == ["process", "docker"]
    assert registry.DEFAULT == "process" == AgentConfig().runtime
    # Both keep a record of their work that a restarted agent recovers (process.json, labels).
    assert registry.get("process").recovers is True
    assert registry.get("docker").recovers is True
    assert registry.recovering_names() == ["process", "docker"]


def test_unknown_runtime_is_rejected():
    with pytest.raises(ValueError, match="must be 'process' or 'docker', got 'podman'"):
        registry.get("podman")
    with pytest.raises(ValueError, match="runtime"):
        AgentConfig(runtime="podman")


def test_leave_running_is_offered_by_every_recovering_runtime(tmp_path):
    assert registry.recovering_names() == ["process", "docker"]
    for name in registry.recovering_names():
        assert AgentConfig(runtime=name, leave_running=True, work_dir=tmp_path).leave_running


def test_cli_offers_the_registered_runtimes():
    option = next(p for p in agent_command.params if p.name == "runtime")
    assert isinstance(option.type, click.Choice)
    assert list(option.type.choices) == registry.names()
    # The default is the config's (a file or the environment may set it), not click's.
    assert agent_config().runtime == registry.DEFAULT
    assert agent_config("--runtime", registry.names()[-1]).runtime == registry.names()[-1]


def test_process_runtime_is_built_from_the_registry(tmp_path):
    runtime = make_runtime(AgentConfig(work_dir=tmp_path))
    assert runtime.name == "process"


def test_importing_the_registry_does_not_import_docker():
    code = (
        "import sys\n"
        "import tether.agent.runtimes.registry, tether.agent.config, tether.agent.agent\n"
        "import tether.agent.cli\n"
        "bad = [m for m in sys.modules if m == 'docker' or m.startswith('docker.')\n"
        "       or m == 'tether.agent.runtimes.docker']\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
