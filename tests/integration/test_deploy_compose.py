"""deploy/docker-compose.yml: valid for Compose itself (``docker compose config``, or Debian's
``docker-compose``), and the mesh it describes: etcd, Jaeger with OTLP, Prometheus scraping
every controller and agent, two of each, each with a health check that its dependents wait on."""

from __future__ import annotations

import shutil
import subprocess

import yaml
from deploy_checks import (
    DEPLOY,
    compose_command,
    configs_of,
    has_option,
    parse_command_line,
    require_tool,
    unknown_variables,
)

COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
CONTROLLERS = ("controller-1", "controller-2")
AGENTS = ("agent-1", "agent-2")


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def compose_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*compose_command(), "--file", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=path.parent,
        timeout=60,
    )


def test_compose_accepts_the_file(tmp_path):
    res = compose_config(COMPOSE)
    assert res.returncode == 0, res.stderr
    # And the same check refuses a broken file: a dependency condition Compose does not know.
    shutil.copy(PROMETHEUS, tmp_path)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("service_healthy", "service_ready", 1))
    res = compose_config(broken)
    assert res.returncode != 0
    assert "service_ready" in res.stderr


def test_the_mesh_has_its_parts():
    s = services()
    assert set(s) == {"etcd", "jaeger", "prometheus", *CONTROLLERS, *AGENTS}
    assert s["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for name in (*CONTROLLERS, *AGENTS):
        assert s[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_every_service_has_a_health_check_that_dependents_wait_for():
    s = services()
    for name, service in s.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name in CONTROLLERS:
        assert s[name]["depends_on"] == {
            "etcd": {"condition": "service_healthy"},
            "jaeger": {"condition": "service_healthy"},
        }
    for name in AGENTS:
        assert s[name]["depends_on"] == {c: {"condition": "service_healthy"} for c in CONTROLLERS}


def test_controllers_and_agents_run_valid_command_lines():
    s = services()
    advertised = set()
    for name in CONTROLLERS:
        params = parse_command_line(s[name]["command"])
        assert params["etcd_endpoints"] == "http://etcd:2379"
        assert params["metrics_listen"] == "0.0.0.0:9100"
        advertised.add(params["advertise"])
        probe = s[name]["healthcheck"]["test"]
        assert probe[1:4] == ["python", "-m", "tether.controller.healthcheck"]
        assert probe[4].rpartition(":")[2] == params["listen"].rpartition(":")[2]
    assert advertised == {f"{c}:7070" for c in CONTROLLERS}
    nodes, work_dirs = set(), set()
    for name in AGENTS:
        args = s[name]["command"]
        assert args[args.index("--metrics-listen") + 1] == "0.0.0.0:9101"
        assert args[args.index("--controller") + 1] == ",".join(sorted(advertised))
        if not has_option("agent", "--metrics-listen"):
            i = args.index("--metrics-listen")
            args = args[:i] + args[i + 2 :]
        params = parse_command_line(args)
        nodes.add(params["node"])
        work_dirs.add(str(params["work_dir"]))
        # Same path inside and out, so the engine can mount attempt directories into tasks.
        assert f"{params['work_dir']}:{params['work_dir']}" in s[name]["volumes"]
        assert "/var/run/docker.sock:/var/run/docker.sock" in s[name]["volumes"]
        assert s[name]["healthcheck"]["test"][-1] == "http://127.0.0.1:9101/metrics"
    assert len(nodes) == len(work_dirs) == len(AGENTS), "each agent its own node and work dir"
    for name in (*CONTROLLERS, *AGENTS):
        assert not unknown_variables(set(s[name]["environment"]), "controller", "agent")


def test_tether_containers_are_confined():
    s = services()
    for name in (*CONTROLLERS, *AGENTS):
        assert s[name]["read_only"] is True, name
        assert s[name]["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s[name]["security_opt"], name
    for name in CONTROLLERS:
        assert "user" not in s[name], "controllers run as the image's non-root user"


def test_prometheus_scrapes_every_controller_and_agent():
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    assert targets == {
        "tether-controller": {f"{c}:9100" for c in CONTROLLERS},
        "tether-agent": {f"{a}:9101" for a in AGENTS},
    }
    assert (
        "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services()["prometheus"]["volumes"]
    )


def test_prometheus_config_passes_promtool():
    promtool = require_tool("promtool", "it checks deploy/prometheus.yml (Debian: prometheus)")
    res = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_controllers_and_agents_build_their_configs():
    s = services()
    names = [*CONTROLLERS, *AGENTS]
    configs = configs_of([(s[n]["command"], s[n]["environment"]) for n in names])
    by_name = dict(zip(names, configs, strict=True))
    for name in CONTROLLERS:
        config = by_name[name].get("config")
        assert config, by_name[name]
        # Plaintext on the compose network must be asked for, or the controller exits.
        assert config["insecure"] is True and config["listen"] == "0.0.0.0:7070"
        assert config["advertise"] == f"{name}:7070"
        assert config["etcd_endpoints"] == ["http://etcd:2379"]
    for name in AGENTS:
        config = by_name[name].get("config")
        assert config, by_name[name]
        assert config["node"] == name and config["runtime"] == "docker"
        assert config["controller"] == "controller-1:7070,controller-2:7070"
