"""The Compose file's controllers serve plaintext with no tokens (--insecure, no --auth)
"for one host only": they must publish their ports on the host's loopback alone, or anyone
on the host's network could submit tasks, which the agents run through the host's Docker
socket (root on the host), and read every secret."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_controllers_without_auth_publish_on_loopback_only():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    bad = []
    for name, svc in compose["services"].items():
        cmd = [str(c) for c in svc.get("command") or []]
        if not cmd or cmd[0] != "controller":
            continue
        if "--auth" in cmd or "--tls-cert" in cmd:
            continue
        for port in svc.get("ports") or []:
            spec = str(port)
            if not spec.startswith(("127.0.0.1:", "[::1]:", "localhost:")):
                bad.append(f"{name}: {spec}")
    assert not bad, (
        "controllers without auth or TLS publish their port on all host interfaces: "
        + ", ".join(bad)
    )
