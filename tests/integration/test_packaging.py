"""Packaging, lint, and the README's main command (tether dev --run the example)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT, wait_for


def test_wheel_installs_only_the_tether_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("tether-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {
        "tether",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for module in (
        "tether/api/v1/controller_pb2.py",
        "tether/sdk/client.py",
        "tether/controller/engine.py",
        "tether/agent/runner.py",
        # PEP 561 markers: type checkers use the SDK's annotations and the API's stubs.
        "tether/sdk/py.typed",
        "tether/api/py.typed",
        "tether/api/v1/types_pb2.pyi",
    ):
        assert module in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    base = [
        line
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert not any(re.search(r"etcd|docker", line) for line in base), "the SDK stays light"


def test_sdk_does_not_import_servers():
    code = (
        "import sys, tether.sdk, tether.sdk.cli;"
        "bad=[m for m in sys.modules if m.startswith(('tether.controller','tether.agent',"
        "'etcd3aio','docker'))];print(bad);sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout


def test_ruff_format_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run(
        [ruff, "format", "--check", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()


def test_dev_runs_the_example_to_completion(tmp_path):
    """The README's main command, run where a user would: the data dir is relative."""
    env = {**os.environ, "COLUMNS": "160"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "dev",
            "--agents",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "3",
            "--run",
            str(ROOT / "examples" / "fraud_detection.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / ".tether-dev" / "etcd").is_dir()
    assert "SUCCEEDED" in res.stdout
    assert "6 of 406 transactions flagged as anomalous" in res.stdout
    assert "tether dev: stopped" in res.stderr


def test_dev_stops_everything_on_ctrl_c(tmp_path):
    import signal
    import socket

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "dev",
            "--agents",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "dev"),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "ready" in line:
            break
    first = next(x for x in lines if x.startswith("tether dev: etcd"))
    etcd_addr = first.split()[3].rstrip(",")
    ctl_addr = first.split()[5].rstrip(",")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 0
    assert "tether dev: stopped" in rest

    def listening(addr: str) -> bool:
        host, port = addr.rsplit(":", 1)
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    # The sockets close as the processes exit; wait for that rather than a fixed time.
    wait_for(lambda: not any(listening(a) for a in (etcd_addr, ctl_addr)), 10, "ports to close")
    for addr in (etcd_addr, ctl_addr):
        assert not listening(addr), f"{addr} still listening"
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if str(tmp_path) in cmd:
                leftovers.append(cmd)
    assert not leftovers, leftovers
