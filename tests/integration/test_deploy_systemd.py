"""deploy/systemd: both units score at most 5 in ``systemd-analyze security`` (offline, from
the file), load without a warning, run as the dedicated users that tether.sysusers creates,
and start the ``tether`` commands with flags and variables those commands know."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import (
    DEPLOY,
    configs_of,
    has_option,
    parse_command_line,
    require_tool,
    unknown_variables,
)

from tether.sdk.certs import init_ca, issue_node

SYSTEMD = DEPLOY / "systemd"
UNITS = {"tether-controller.service": "controller", "tether-agent.service": "agent"}
MAX_EXPOSURE = 5.0
_WHY = "it checks the systemd units (Debian: systemd)"


def directives(unit: Path) -> list[tuple[str, str]]:
    """``(key, value)`` of each line of the unit's [Service] section, in order."""
    out, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def service(unit: Path) -> dict[str, list[str]]:
    d: dict[str, list[str]] = {}
    for key, value in directives(unit):
        d.setdefault(key, []).append(value)
    return d


def exposure(unit: Path) -> float:
    analyze = require_tool("systemd-analyze", _WHY)
    res = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout)
    assert found, res.stdout + res.stderr
    return float(found.group(1))


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_scores_at_most_5(name):
    score = exposure(SYSTEMD / name)
    print(f"{name}: systemd-analyze security exposure {score}")
    assert score <= MAX_EXPOSURE


def test_the_score_reflects_the_hardening(tmp_path):
    # Without its hardening lines, the same unit is what main had: UNSAFE.
    bare = tmp_path / "tether-controller.service"
    keep = ("Type", "User", "Group", "Environment", "ExecStart", "Restart", "RestartSec")
    lines = [f"{k}={v}" for k, v in directives(SYSTEMD / bare.name) if k in keep]
    bare.write_text("[Unit]\nDescription=bare\n\n[Service]\n" + "\n".join(lines) + "\n")
    assert exposure(bare) > 9


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_the_named_hardening(name):
    s = service(SYSTEMD / name)
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["User"][0] not in ("root", "0")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_loads_without_warnings(name, tmp_path):
    analyze = require_tool("systemd-analyze", _WHY)
    # verify checks that ExecStart's program exists: point it at this checkout's tether.
    tether = Path(sys.executable).parent / "tether"
    unit = tmp_path / name
    unit.write_text((SYSTEMD / name).read_text().replace("/usr/local/bin/tether", str(tether)))
    res = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    own = [line for line in res.stderr.splitlines() if name in line]
    assert res.returncode == 0 and not own, res.stderr


def test_verify_catches_an_unknown_directive(tmp_path):
    analyze = require_tool("systemd-analyze", _WHY)
    unit = tmp_path / "tether-agent.service"
    text = (SYSTEMD / unit.name).read_text()
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSystm=strict"))
    res = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSystm" in res.stderr


def test_sysusers_creates_the_units_users(tmp_path):
    sysusers = require_tool("systemd-sysusers", _WHY)
    (tmp_path / "etc").mkdir()
    res = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "tether.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    users = {line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {
        g.split(":")[0]: g.split(":")[3].split(",")
        for g in (tmp_path / "etc/group").read_text().splitlines()
    }
    for name in UNITS:
        s = service(SYSTEMD / name)
        assert s["User"][0] in users, name
        assert s["Group"][0] in groups, name
    # The agent reaches the engine's socket through its group, not a capability.
    assert "tether-agent" in groups["docker"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_a_valid_command_line(name):
    command = UNITS[name]
    s = service(SYSTEMD / name)
    (exec_start,) = s["ExecStart"]
    program, *args = shlex.split(exec_start)
    assert Path(program).name == "tether"
    assert args[0] == command
    env = dict(e.split("=", 1) for e in s.get("Environment", []))
    assert not unknown_variables(set(env), command)
    if "--metrics-listen" in args and not has_option(command, "--metrics-listen"):
        i = args.index("--metrics-listen")
        parse_command_line(args[:i] + args[i + 2 :])
        pytest.skip(f"{command} --metrics-listen is not on this branch yet (the metrics item)")
    parse_command_line(args)
    if command == "agent":
        # Its work dir is the unit's state directory, the one path it may write.
        assert env["TETHER_WORK_DIR"] == "/var/lib/" + s["StateDirectory"][0]


def test_units_build_their_configs(tmp_path):
    # The agent takes its node name from its certificate: give it a real one where the
    # unit expects it.
    init_ca(tmp_path)
    issue_node(tmp_path, "gpu-1")
    files = {"/etc/tether/node.pem": tmp_path / "node-gpu-1.pem"}
    cases = []
    for name in sorted(UNITS):
        s = service(SYSTEMD / name)
        env = dict(e.split("=", 1) for e in s.get("Environment", []))
        env = {k: str(files.get(v, v)) for k, v in env.items()}
        cases.append((shlex.split(s["ExecStart"][0])[1:], env))
    agent, controller = configs_of(cases)
    assert "config" in controller, controller
    assert controller["config"]["tls_cert"] == "/etc/tether/controller.pem"
    assert controller["config"]["metrics_listen"] == "0.0.0.0:9100"
    assert "config" in agent, agent
    assert agent["config"]["node"] == "gpu-1"
    assert agent["config"]["work_dir"] == "/var/lib/tether-agent"
    assert agent["config"]["runtime"] == "docker" and agent["config"]["leave_running"] is True
