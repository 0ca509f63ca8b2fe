"""Found by a review: a controller whose --metrics-listen port is taken exits with its error
and then a traceback ("Exception ignored in: <function Server.__del__ ...> RuntimeError: Event
loop is closed"): server.start() starts the gRPC server before it binds the metrics port and
does not stop it when that fails. The message also blames the gRPC address ("cannot serve on
<listen>: metrics_listen: ...")."""

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
