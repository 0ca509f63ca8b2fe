"""A controller whose --metrics-listen port is taken exits with one line naming that
address, before anything else has started (no traceback, no gRPC server left behind)."""

from __future__ import annotations

import socket

from helpers import tether


def test_controller_with_a_taken_metrics_port_exits_with_one_line(mesh):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = tether(
            "controller",
            "--etcd",
            mesh.config.etcd_endpoints[0],
            "--prefix",
            "/taken-metrics",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            f"127.0.0.1:{port}",
            timeout=60,
        )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and f"127.0.0.1:{port}" in last, last
    assert "metrics_listen" in last and "cannot serve on 127.0.0.1:0" not in last, last
