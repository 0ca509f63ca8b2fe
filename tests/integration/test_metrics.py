"""The controller's and the agents' /metrics: scraped over HTTP, moving with a run, and clean
by ``promtool check metrics`` (where promtool is installed; CI installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import Mesh, assert_one_line_error, py, tether, wait_for
from prometheus_client.parser import text_string_to_metric_families

from tether.sdk import Workflow
from tether.sdk.errors import NotFoundError


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


def promtool_check(text: str) -> None:
    """``promtool check metrics`` finds nothing wrong with ``text``."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (apt-get install prometheus); CI needs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def metered(etcd, prefix, tmp_path):
    """A mesh whose controller and agent both serve /metrics on free ports."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", metrics_listen="127.0.0.1:0")
    mesh.start_controller()
    yield mesh
    mesh.close()


def test_both_endpoints_move_with_a_run(metered: Mesh, tmp_path):
    agent = metered.add_agent("n1", metrics_listen="127.0.0.1:0")
    ctl_port, agent_port = metered.controller.metrics_port, agent.metrics_port
    assert ctl_port and agent_port
    before_ctl, before_agent = scrape(ctl_port), scrape(agent_port)
    assert value(before_ctl, "tether_leader") == 1
    assert value(before_ctl, "tether_node_connected", node="n1") == 1
    assert value(before_agent, "tether_agent_attempts_finished_total") == 0

    go = tmp_path / "go"
    wf = Workflow("metered")
    wf.task("ok", py(f"import os,time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)"))
    wf.task("bad", py("import sys; sys.exit(3)"))
    wf.task("unstartable", ["/nonexistent/program"])
    client = metered.client()
    run = client.submit(wf)
    # While `ok` runs, the agent's gauge and the controller's per-node gauges (built at
    # scrape time) show it.
    wait_for(lambda: value(scrape(agent_port), "tether_agent_attempts_running") == 1, 20, "running")
    # The controller counts an attempt until its final report is in: `bad` and `unstartable`
    # end at once, but their reports may still be on the way.
    wait_for(
        lambda: value(scrape(ctl_port), "tether_node_running_attempts", node="n1") == 1,
        20,
        "the controller's count of running attempts",
    )
    during = scrape(ctl_port)
    assert value(during, "tether_node_running_attempts", node="n1") == 1
    assert value(during, "tether_runs_active") == 1
    go.touch()
    final = run.wait(timeout=30)
    with pytest.raises(NotFoundError):
        client.get_run("0" * 20)
    wait_for(
        lambda: value(scrape(agent_port), "tether_agent_heartbeat_rtt_seconds_count"), 10, "rtt"
    )
    after_ctl, after_agent = scrape(ctl_port), scrape(agent_port)

    # Controller: runs by outcome and duration, RPCs by method and code, etcd latency.
    assert value(after_ctl, "tether_runs_finished_total", state="FAILED") == 1
    assert value(after_ctl, "tether_run_duration_seconds_count", state="FAILED") == 1
    run_seconds = (final.finished_at.ToNanoseconds() - final.created_at.ToNanoseconds()) / 1e9
    assert value(after_ctl, "tether_run_duration_seconds_sum") == pytest.approx(run_seconds)
    submit = {"grpc_method": "SubmitWorkflow", "grpc_code": "OK"}
    assert value(after_ctl, "grpc_server_handled_total", **submit) == 1
    assert value(after_ctl, "grpc_server_handling_seconds_count", **submit) == 1
    assert (
        value(after_ctl, "grpc_server_handled_total", grpc_method="GetRun", grpc_code="NOT_FOUND")
        == 1
    )
    assert value(after_ctl, "grpc_server_started_total", grpc_method="Connect") >= 1
    for op in ("txn", "range"):
        grew = value(after_ctl, "tether_etcd_request_duration_seconds_count", operation=op) - value(
            before_ctl, "tether_etcd_request_duration_seconds_count", operation=op
        )
        assert grew > 0, op
    assert value(after_ctl, "tether_etcd_request_errors_total") == 0
    assert value(after_ctl, "tether_node_running_attempts", node="n1") == 0

    # Agent: attempts by outcome, their durations, start latency, runtime errors, heartbeats.
    finished = "tether_agent_attempts_finished_total"
    assert value(after_agent, finished, outcome="succeeded") == 1
    assert value(after_agent, finished, outcome="exit_code") == 1
    assert value(after_agent, finished, outcome="runtime_error") == 1
    assert value(after_agent, "tether_agent_attempt_duration_seconds_count") == 3
    assert value(after_agent, "tether_agent_start_duration_seconds_count", runtime="process") == 2
    assert value(after_agent, "tether_agent_runtime_errors_total", reason="runtime_error") == 1
    assert value(after_agent, "tether_agent_attempts_running") == 0
    assert value(after_agent, "tether_agent_heartbeat_rtt_seconds_count") >= 1

    promtool_check(after_ctl)
    promtool_check(after_agent)


def test_etcd_errors_are_counted(metered: Mesh):
    store = metered.controller.store
    metrics = metered.controller.metrics

    async def fail():
        async with store._request("get"):
            raise TimeoutError("etcd did not answer")

    with pytest.raises(TimeoutError):
        metered.call(fail())
    text = scrape(metered.controller.metrics_port)
    assert value(text, "tether_etcd_request_errors_total", operation="get") == 1
    assert metrics.etcd_errors.labels("get")._value.get() == 1


def test_dev_serves_metrics_for_the_controller_and_each_agent(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "dev",
            *("--agents", "1", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
            *("--data-dir", str(tmp_path / "dev")),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "ready" in line:
                break
        urls = {
            line.split()[4]: line.split()[6] for line in lines if "tether dev: metrics of" in line
        }
        assert set(urls) == {"controller", "dev-1"}, lines
        ctl = urllib.request.urlopen(urls["controller"], timeout=5).read().decode()
        agent = urllib.request.urlopen(urls["dev-1"], timeout=5).read().decode()
        assert value(ctl, "tether_leader") == 1
        assert (
            "tether_agent_attempts_running",
            frozenset({("node", "dev-1")}),
        ) in samples(agent)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.stderr.read()
        assert proc.wait(60) == 0


def test_a_taken_or_malformed_metrics_address_is_one_line(metered: Mesh, tmp_path):
    taken = f"127.0.0.1:{metered.controller.metrics_port}"
    work = str(tmp_path / "w")
    res = tether(
        "agent",
        "--name",
        "m1",
        "--work-dir",
        work,
        "--metrics-listen",
        taken,
        controller=metered.address,
    )
    assert_one_line_error(res, "metrics_listen", taken, "in use")
    # Malformed: one line naming the setting and what is wrong with the value.
    res = tether("agent", "--name", "m1", "--work-dir", work, "--metrics-listen", "nowhere")
    assert_one_line_error(res, "metrics_listen", "'nowhere' has no port")
    # tether dev: a usage error (click's usage lines, then the one line naming the flag).
    res = tether("dev", "--metrics-listen", "nowhere")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "metrics" in res.stderr.strip().splitlines()[-1]
    assert "'nowhere' is not HOST:PORT" in res.stderr


def test_a_node_that_is_gone_leaves_the_controllers_metrics(etcd, prefix, tmp_path):
    """Per-node gauges are built from the controller's node cache, which never forgets a
    node: once its lease expired and its record is deleted (``tether nodes`` no longer lists
    it), it is still exported, forever, as disconnected, with a heartbeat age that only grows.
    With the DaemonSet's node names (an autoscaled cluster's nodes come and go) the series
    grow without bound over a leader's life."""
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", metrics_listen="127.0.0.1:0")
    try:
        mesh.start_controller()
        port = mesh.controller.metrics_port
        client = mesh.client()
        for i in range(3):  # nodes of an autoscaled pool: each with a name of its own
            mesh.add_agent(f"pool-{i}")
            mesh.stop_agent(f"pool-{i}")
        wait_for(lambda: client.nodes() == [], 20, "the nodes' records to expire")
        time.sleep(0.5)
        text = scrape(port)
    finally:
        mesh.close()
    stale = sorted(
        {
            dict(ls)["node"]
            for (name, ls), _ in samples(text).items()
            if name.startswith("tether_node_")
        }
    )
    assert stale == [], f"gone nodes still exported: {stale}"
