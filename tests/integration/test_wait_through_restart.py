"""``RunHandle.wait`` and ``tether submit --wait`` ride out a controller that goes away while
they wait, as ``tether watch`` does: a restart on the same etcd, or a failover to another of
the client's controllers. Errors that are not about availability still raise at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import PY, ControllerProcess, Mesh, wait_for

from tether.api.v1 import types_pb2 as t
from tether.sdk import Client, NotFoundError, Workflow

RUNNING = t.TaskState.TASK_STATE_RUNNING
SUCCEEDED = t.RunState.RUN_STATE_SUCCEEDED
SLEEP = 6.0  # the task outlasts the controller's absence


def _sleeper() -> Workflow:
    wf = Workflow("wait-through-restart")
    wf.task("long", [PY, "-c", f"import time; time.sleep({SLEEP})"])
    return wf


class _Waiter(threading.Thread):
    """``run.wait()`` on a thread, keeping what it returned or raised."""

    def __init__(self, run, timeout: float) -> None:
        super().__init__(daemon=True)
        self.run_handle, self.timeout = run, timeout
        self.final: t.Run | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.final = self.run_handle.wait(timeout=self.timeout)
        except BaseException as e:
            self.error = e


def _running(client: Client, run_id: str) -> bool:
    return all(tk.state == RUNNING for tk in client.get_run(run_id).tasks)


@pytest.mark.timeout(90)
def test_wait_returns_the_final_run_although_the_controller_restarted(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log")
    a.start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    client = Client(a.address, timeout=10)
    try:
        mesh.add_agent("n1", controller=a.address)
        run = client.submit(_sleeper())
        wait_for(lambda: _running(client, run.id), 20, "the task running")
        waiter = _Waiter(run, timeout=60)
        waiter.start()
        time.sleep(0.3)  # the wait is watching
        a.stop()  # SIGTERM
        time.sleep(2.5)  # longer than gRPC's own retries of a read
        assert waiter.is_alive(), waiter.error  # still waiting, not failed
        a.start()
        waiter.join(60)
        assert waiter.error is None, repr(waiter.error)
        assert waiter.final is not None and waiter.final.state == SUCCEEDED, waiter.final
        assert [tk.spec.name for tk in waiter.final.tasks] == ["long"]
    finally:
        client.close()
        mesh.close()
        a.stop()


@pytest.mark.timeout(90)
def test_wait_moves_to_the_standby_when_the_leader_dies(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log")
    b = ControllerProcess(etcd.endpoint, prefix, tmp_path / "b.log")
    a.start()
    b.start(leader=False)
    both = f"{a.address},{b.address}"
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    client = Client(both, timeout=10)
    try:
        mesh.add_agent("n1", controller=both, reconnect_initial=0.1, reconnect_max=1.0)
        run = client.submit(_sleeper())
        wait_for(lambda: _running(client, run.id), 20, "the task running")
        waiter = _Waiter(run, timeout=60)
        waiter.start()
        time.sleep(0.3)
        # SIGKILL: no resignation, so for a leader TTL the standby refuses (not_leader) and
        # the old leader refuses connections; the wait keeps trying both.
        a.kill()
        waiter.join(60)
        assert waiter.error is None, repr(waiter.error)
        assert waiter.final is not None and waiter.final.state == SUCCEEDED, waiter.final
    finally:
        client.close()
        mesh.close()
        a.stop()
        b.stop()


@pytest.mark.timeout(90)
def test_submit_wait_survives_a_controller_restart(etcd, prefix, tmp_path):
    a = ControllerProcess(etcd.endpoint, prefix, tmp_path / "a.log")
    a.start()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    spec = tmp_path / "long.yaml"
    spec.write_text(
        "name: wait-through-restart\n"
        "tasks:\n"
        "  - name: long\n"
        f"    command: [{PY}, -c, 'import time; time.sleep({SLEEP})']\n"
    )
    client = Client(a.address, timeout=10)
    cli = None
    try:
        mesh.add_agent("n1", controller=a.address)
        cli = subprocess.Popen(
            [sys.executable, "-m", "tether.sdk.cli", "submit", str(spec), "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_without_tether_settings(), "TETHER_CONTROLLER": a.address, "NO_COLOR": "1"},
        )
        wait_for(lambda: any(True for _ in client.list_runs()), 20, "the run submitted")
        (r,) = list(client.list_runs())
        wait_for(lambda: _running(client, r.id), 20, "the task running")
        a.stop()
        time.sleep(2.5)
        assert cli.poll() is None, cli.communicate()
        a.start()
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, (out, err)
        assert "unavailable" not in err, err
        assert client.get_run(r.id).state == SUCCEEDED
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        client.close()
        mesh.close()
        a.stop()


def _without_tether_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}


def test_wait_raises_at_once_when_the_run_does_not_exist(mesh):
    t0 = time.monotonic()
    with pytest.raises(NotFoundError):
        mesh.client().run("0" * 20).wait(timeout=30)
    assert time.monotonic() - t0 < 5
