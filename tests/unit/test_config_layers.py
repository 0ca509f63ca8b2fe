"""Server configs: defaults < --config FILE < environment < flags, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_helpers import agent_config, controller_config

from tether.sdk.settings import ConfigError, settings_of


def _file(tmp_path: Path, text: str) -> str:
    f = tmp_path / "conf.yaml"
    f.write_text(text)
    return str(f)


def test_file_then_environment_then_flags(tmp_path):
    conf = _file(
        tmp_path,
        "lease_ttl: 7\nprefix: /from-file\nretention: 7d\nleader-ttl: 4\n"
        "etcd_endpoints: [a:2379, b:2379]\nlimits:\n  max_spec_bytes: 1Mi\n",
    )
    c = controller_config("--config", conf)
    assert (c.lease_ttl, c.prefix, c.retention, c.leader_ttl) == (7, "/from-file", 7 * 86400, 4)
    assert c.etcd_endpoints == ("a:2379", "b:2379") and c.limits.max_spec_bytes == 2**20
    env = {"TETHER_PREFIX": "/from-env", "TETHER_LEASE_TTL": "8", "TETHER_ETCD": "c:1,d:2"}
    c = controller_config("--config", conf, env=env)
    assert (c.lease_ttl, c.prefix, c.etcd_endpoints) == (8, "/from-env", ("c:1", "d:2"))
    c = controller_config("--config", conf, "--lease-ttl", "9", env=env)
    assert (c.lease_ttl, c.prefix, c.retention) == (9, "/from-env", 7 * 86400)
    # Nothing given: the class's defaults, not click's.
    assert controller_config().lease_ttl == 10
    # A flag turns off what the file turned on.
    auth = _file(tmp_path, "auth: true\n")
    assert controller_config("--config", auth).auth
    assert not controller_config("--config", auth, "--no-auth").auth
    assert controller_config("--auth").auth and not controller_config().auth


def test_unknown_setting_names_file_line_and_the_likely_one(tmp_path):
    conf = _file(tmp_path, "prefix: /x\nlease_tll: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"conf\.yaml:2: unknown setting 'lease_tll' \(did you mean 'lease_ttl'\?\)",
    ):
        controller_config("--config", conf)
    conf = _file(tmp_path, "limits:\n  max_spec_byte: 3\n")
    with pytest.raises(ConfigError, match=r"conf\.yaml:2: .*did you mean 'limits\.max_spec_bytes'"):
        controller_config("--config", conf)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    conf = _file(tmp_path, "prefix: /x\nlease_ttl: [3\n")
    with pytest.raises(ConfigError) as e:
        controller_config("--config", conf)
    assert f"{conf}:3:1: not valid YAML" in str(e.value) and "unicode string" not in str(e.value)
    with pytest.raises(ConfigError, match="expected a mapping"):
        controller_config("--config", _file(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        controller_config("--config", str(tmp_path / "missing.yaml"))


def test_bad_values_name_the_field_and_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"lease_ttl: .*valid integer.*\(from --lease-ttl\)"):
        controller_config("--lease-ttl", "soon")
    with pytest.raises(ConfigError, match=r"lease_ttl: .*\(from TETHER_LEASE_TTL\)"):
        controller_config(env={"TETHER_LEASE_TTL": "soon"})
    conf = _file(tmp_path, "prefix: /x\nretention: forever\n")
    with pytest.raises(ConfigError, match=r"retention: invalid duration 'forever'.*conf\.yaml:2"):
        controller_config("--config", conf)
    with pytest.raises(ConfigError, match="leader_ttl: must be >= 2 seconds"):
        controller_config("--leader-ttl", "1")


def test_agent_layers_labels_sizes_and_derived_defaults(tmp_path):
    conf = _file(tmp_path, "node: n7\nlabels: {zone: a}\nlog_limit_bytes: 1Mi\n")
    a = agent_config("--config", conf)
    assert a.node == "n7" and a.labels == {"zone": "a"} and a.log_limit_bytes == 2**20
    assert a.work_dir.name == "tether-agent-n7"  # derived from the node when not set
    a = agent_config("--config", conf, "--label", "rack=3", "--memory", "2Gi", "--name", "n8")
    assert a.labels == {"rack": "3"} and a.memory_bytes == 2 * 2**30 and a.node == "n8"
    a = agent_config(env={"TETHER_LABELS": "x=1,y=2", "DOCKER_HOST": "unix:///p.sock"})
    assert a.labels == {"x": "1", "y": "2"} and a.docker_host == "unix:///p.sock"
    with pytest.raises(ConfigError, match=r"labels: .*'oops': use KEY=VALUE.*--label"):
        agent_config("--label", "oops")


def test_every_setting_is_described_and_has_a_distinct_env():
    from tether.agent.config import AgentConfig
    from tether.controller.config import ControllerConfig

    for cls in (ControllerConfig, AgentConfig):
        all_settings = settings_of(cls)
        assert all(s.description for s in all_settings), [s.name for s in all_settings]
        envs = [s.env for s in all_settings]
        assert len(envs) == len(set(envs)), envs
