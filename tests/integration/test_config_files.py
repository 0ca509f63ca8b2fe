"""`tether controller --config` and `tether agent --config` against real etcd and processes."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import agent_process, assert_one_line_error, etcd_dump, health, tether, wait_for

from tether.controller.etcd_process import free_port
from tether.sdk.client import Client


def test_servers_read_their_config_files_under_env_and_flags(etcd, prefix, tmp_path):
    port = free_port()
    controller_yaml = tmp_path / "controller.yaml"
    controller_yaml.write_text(
        f"etcd_endpoints: [{etcd.endpoint}]\nprefix: {prefix}\nlisten: 127.0.0.1:{port}\n"
        "lease_ttl: 30\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    log = open(tmp_path / "controller.log", "ab")
    controller = subprocess.Popen(
        [sys.executable, "-m", "tether.sdk.cli", "controller", "--config", str(controller_yaml)],
        stdout=log,
        stderr=log,
        # The environment overrides the file: a short lease, so the test stops quickly.
        env={**env, "TETHER_LEASE_TTL": "2", "TETHER_LOG_FORMAT": "json"},
    )
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text("labels: {zone: from-file, rack: r1}\ncpu: 7\nmax_tasks: 3\n")
    agent = None
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: _serving(address), 30, "the controller from its config file")
        # agent_process passes --cpu 2 and --memory 1Gi: flags override the file's cpu.
        agent = agent_process(address, "conf-node", tmp_path / "agent", "--config", str(agent_yaml))
        client = Client(address, tls_ca="", token="")
        wait_for(lambda: client.nodes(), 30, "the agent to register")
        (node,) = client.nodes()
        assert node.name == "conf-node"
        assert dict(node.labels) == {"zone": "from-file", "rack": "r1"}
        assert node.capacity.cpu == 2 and node.capacity.memory_bytes == 2**30
        keys = etcd_dump(etcd.endpoint, prefix)
        assert f"{prefix}/nodes/conf-node".encode() in keys  # the file's prefix
    finally:
        for p in (agent, controller):
            if p is not None:
                p.terminate()
                p.wait(20)


def _serving(address: str) -> bool:
    try:
        return health(address, "tether.v1.ControllerService") == 1
    except Exception:
        return False


def test_bad_config_files_are_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "controller.yaml"
    bad.write_text("listen: 127.0.0.1:0\npolcy: first-fit\n")
    res = tether("controller", "--config", str(bad))
    assert_one_line_error(res, f"{bad}:2: unknown setting 'polcy' (did you mean 'policy'?)")
    broken = tmp_path / "agent.yaml"
    broken.write_text("labels: {zone: a\ncpu: 2\n")
    res = tether("agent", "--config", str(broken))
    assert_one_line_error(res, f"{broken}:", "not valid YAML")
    res = tether("agent", "--max-tasks", "many")
    assert_one_line_error(res, "max_tasks:", "(from --max-tasks)")
