"""The container health probe (``python -m tether.controller.healthcheck``) against a real
controller: gRPC health over plaintext and TLS, and HTTP for a metrics endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Mesh

from tether.controller.etcd_process import free_port
from tether.controller.server import ControllerServer
from tether.sdk.certs import init_ca, issue_controller


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tether.controller.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def metered(etcd, prefix, tmp_path):
    """A leading controller that also serves /metrics on a free port."""
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", metrics_listen="127.0.0.1:0")
    m.start_controller()
    yield m
    m.close()


def test_serving_controller_is_healthy(metered: Mesh):
    res = probe(metered.address)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"healthy: {metered.address}"
    # The leader also serves the API itself.
    res = probe("--service", "tether.v1.ControllerService", metered.address)
    assert res.returncode == 0, res.stderr


def test_standby_is_healthy_but_does_not_serve_the_api(metered: Mesh, etcd, prefix, tmp_path):
    standby = Mesh(etcd.endpoint, prefix, tmp_path / "standby")
    try:
        server = standby.controller = ControllerServer(standby.config)
        standby.call(server.start(wait_for_leadership=False))
        assert not server.is_leader
        assert probe(standby.address).returncode == 0
        res = probe("--service", "tether.v1.ControllerService", standby.address)
        assert res.returncode == 1
        assert "tether.v1.ControllerService is NOT_SERVING" in res.stderr
    finally:
        standby.close()


def test_nothing_listening_is_unhealthy_with_the_reason():
    address = f"127.0.0.1:{free_port()}"
    res = probe("--timeout", "1", address)
    assert res.returncode == 1
    assert res.stderr.startswith(f"unhealthy: {address}: "), res.stderr
    assert "UNAVAILABLE" in res.stderr or "DEADLINE_EXCEEDED" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_address_without_a_port_is_refused_not_tried_on_443():
    res = probe("--timeout", "1", "127.0.0.1")
    assert res.returncode == 1 and "has no port" in res.stderr, res.stderr


def test_http_address_checks_the_metrics_endpoint(metered: Mesh):
    port = metered.controller.metrics_port
    res = probe(f"http://127.0.0.1:{port}/metrics")
    assert res.returncode == 0, res.stderr
    res = probe(f"http://127.0.0.1:{free_port()}/metrics", "--timeout", "1")
    assert res.returncode == 1
    assert res.stderr.startswith("unhealthy: http://127.0.0.1:"), res.stderr


def test_default_address_comes_from_the_environment(metered: Mesh):
    res = subprocess.run(
        [sys.executable, "-m", "tether.controller.healthcheck"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TETHER_HEALTH_ADDRESS": metered.address},
    )
    assert res.returncode == 0, res.stderr
    assert metered.address in res.stdout


def test_tls_probe_checks_the_certificate_by_its_server_name(etcd, prefix, tmp_path: Path):
    pki = tmp_path / "pki"
    init_ca(pki)
    # The certificate names the service, not the loopback address the probe dials.
    issue_controller(pki, ["ctl.tether.test"])
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        m.start_controller(
            tls_cert=str(pki / "controller.pem"), tls_key=str(pki / "controller-key.pem")
        )
        ca = str(pki / "ca.pem")
        res = probe("--tls-ca", ca, "--server-name", "ctl.tether.test", m.address)
        assert res.returncode == 0, res.stderr
        res = probe("--tls-ca", ca, "--timeout", "2", m.address)
        assert res.returncode == 1, "the name 127.0.0.1 is not the certificate's"
        res = probe(m.address, "--timeout", "2")
        assert res.returncode == 1, "plaintext to a TLS port"
        res = probe("--tls-ca", str(tmp_path / "missing.pem"), m.address)
        assert res.returncode == 1
        assert "--tls-ca: cannot read" in res.stderr
    finally:
        m.close()
