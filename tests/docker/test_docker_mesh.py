"""Agents with the docker runtime in a real mesh: results, failures, cancel, removal, and
recovery after an agent restart (adopting current attempts, killing stale ones)."""

from __future__ import annotations

import json

import pytest
from dockerutil import BUSYBOX, NODE_PREFIX, is_podman, managed_containers
from helpers import Mesh, R, S

from tether.sdk import Workflow

A = NODE_PREFIX + "a"
B = NODE_PREFIX + "b"


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def write_output(value: dict) -> str:
    return f"echo '{json.dumps(value)}' > \"$TETHER_OUTPUT_FILE\""


@pytest.fixture
def dmesh(etcd, prefix, tmp_path, docker_api, busybox_image):
    """A mesh whose controller gives nodes 5 s leases, so an agent restart fits in one."""
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=5)
    m.start_controller()
    yield m
    m.close()


def containers_of(api, run_id: str, **labels: str) -> list[dict]:
    return managed_containers(api, **{"tether.run": run_id, **labels})


def test_tasks_run_in_containers_and_are_removed_once_recorded(mesh, docker_api, busybox_image):
    mesh.add_agent(A, runtime="docker")
    wf = Workflow("containers")
    wf.task("ok", sh("echo hi; " + write_output({"n": 1})), image=BUSYBOX, cpu=0.5, memory="64Mi")
    wf.task("fails", sh("echo bad >&2; exit 2"), image=BUSYBOX)
    wf.task("pull", ["true"], image=BUSYBOX, image_pull_policy="always")
    client = mesh.client()
    run = client.submit(wf)
    final = run.wait(timeout=60)
    tasks = {tk.spec.name: tk for tk in final.tasks}
    assert tasks["ok"].state == S.TASK_STATE_SUCCEEDED
    assert json.loads(tasks["ok"].outputs_json) == {"n": 1}
    assert tasks["ok"].stdout_tail == "hi\n"
    assert tasks["fails"].state == S.TASK_STATE_FAILED
    assert (tasks["fails"].exit_code, tasks["fails"].reason) == (2, "exit_code")
    assert tasks["fails"].stderr_tail == "bad\n"
    # No registry here: the pull fails, with the engine's message, and was reported as events.
    assert tasks["pull"].state == S.TASK_STATE_FAILED and tasks["pull"].reason == "image"
    assert BUSYBOX in tasks["pull"].message
    assert [e.kind for e in tasks["pull"].events] == ["pulling"]
    mesh.wait_for(lambda: not containers_of(docker_api, run.id), 10, "containers removed")


def test_tether_logs_follows_a_container_to_its_end(mesh, busybox_image):
    mesh.add_agent(A, runtime="docker")
    wf = Workflow("logs")
    script = "for i in 1 2 3; do echo out-$i; echo err-$i >&2; sleep 0.3; done; echo last"
    wf.task("talk", sh(script), image=BUSYBOX)
    run = mesh.client().submit(wf)
    chunks = list(run.logs("talk", follow=True))
    out = b"".join(c.data for c in chunks if c.stream == "stdout").decode()
    err = b"".join(c.data for c in chunks if c.stream == "stderr").decode()
    assert out == "out-1\nout-2\nout-3\nlast\n"
    assert err == "err-1\nerr-2\nerr-3\n"
    assert run.wait(timeout=20).state == R.RUN_STATE_SUCCEEDED


def test_cancel_stops_the_container_within_the_grace_period(mesh, docker_api, busybox_image):
    mesh.add_agent(A, runtime="docker")
    wf = Workflow("cancel")
    wf.task("sleeper", ["sleep", "60"], image=BUSYBOX)
    client = mesh.client()
    run = client.submit(wf)
    mesh.wait_for(
        lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "container running"
    )
    client.cancel(run.id)
    final = run.wait(timeout=mesh.config.cancel_grace + 3)
    assert final.state == R.RUN_STATE_CANCELLED
    assert final.tasks[0].state == S.TASK_STATE_CANCELLED
    mesh.wait_for(lambda: not containers_of(docker_api, run.id), 10, "container removed")


def test_timeout_stops_the_container(mesh, docker_api, busybox_image):
    mesh.add_agent(A, runtime="docker", stop_grace=1.0)
    wf = Workflow("timeout")
    wf.task("slow", ["sleep", "60"], image=BUSYBOX, timeout="1s")
    run = mesh.client().submit(wf)
    final = run.wait(timeout=15)
    task = final.tasks[0]
    assert (task.state, task.reason) == (S.TASK_STATE_FAILED, "timeout")
    took = (task.finished_at.ToNanoseconds() - task.started_at.ToNanoseconds()) / 1e9
    assert 1.0 <= took < 4.0, took
    mesh.wait_for(lambda: not containers_of(docker_api, run.id), 10, "container removed")


def test_agent_that_stops_stops_its_containers_and_the_attempt_is_retried(
    mesh, docker_api, busybox_image
):
    mesh.add_agent(A, runtime="docker")
    mesh.add_agent(B, runtime="docker")
    wf = Workflow("shutdown")
    script = 'if [ "$TETHER_ATTEMPT" = 1 ]; then sleep 60; fi; ' + write_output({"ok": 1})
    wf.task("job", sh(script), image=BUSYBOX)
    run = mesh.client().submit(wf)
    mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
    mesh.stop_agent(A)  # a plain stop: no --leave-running
    assert not containers_of(docker_api, run.id), "stopped and removed with its agent"
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED, final.message
    assert [(a.number, a.node, a.state) for a in final.tasks[0].attempts] == [
        (1, A, S.TASK_STATE_LOST),
        (2, B, S.TASK_STATE_SUCCEEDED),
    ]


def test_gpu_task_fails_clearly_on_an_engine_without_the_nvidia_runtime(
    mesh, docker_api, busybox_image
):
    if is_podman(docker_api):
        pytest.skip("Podman's Docker API ignores device requests (Podman uses CDI for GPUs)")
    mesh.add_agent(A, runtime="docker", fake_gpus="2")
    wf = Workflow("gpu")
    wf.task("cuda", ["true"], image=BUSYBOX, gpu=1)
    final = mesh.client().submit(wf).wait(timeout=30)
    task = final.tasks[0]
    assert task.state == S.TASK_STATE_FAILED and task.reason == "runtime_error"
    assert "nvidia" in task.message


def test_restarted_agent_adopts_its_running_and_finished_containers(dmesh, docker_api):
    dmesh.add_agent(A, runtime="docker")
    wf = Workflow("adopt")
    wf.task(
        "long", sh("echo begun; sleep 3; echo done; " + write_output({"long": 1})), image=BUSYBOX
    )
    wf.task("short", sh("sleep 0.5; " + write_output({"short": 1})), image=BUSYBOX)
    client = dmesh.client()
    run = client.submit(wf)
    dmesh.wait_for(
        lambda: all(tk.state == S.TASK_STATE_RUNNING for tk in run.status().tasks),
        20,
        "both containers running",
    )
    # The agent goes away as if killed; its containers run on without it.
    dmesh.stop_agent(A, leave_running=True)
    dmesh.wait_for(
        lambda: (
            not docker_api.containers(
                filters={"label": [f"tether.run={run.id}", "tether.task=short"]}
            )
        ),
        10,
        "the short task ended while no agent watched",
    )
    agent = dmesh.add_agent(A, runtime="docker")  # same node name, same work dir
    assert [ref.task for ref in agent.runner.running_refs()] == ["long"]
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED, final.message
    tasks = {tk.spec.name: tk for tk in final.tasks}
    for name in ("long", "short"):
        assert [a.number for a in tasks[name].attempts] == [1], "adopted, not retried"
        assert json.loads(tasks[name].outputs_json) == {name: 1}
    assert tasks["long"].stdout_tail == "begun\ndone\n"
    dmesh.wait_for(lambda: not containers_of(docker_api, run.id), 10, "containers removed")


def test_restarted_agent_has_its_stale_attempt_killed(mesh, docker_api, busybox_image):
    mesh.add_agent(A, runtime="docker")
    mesh.add_agent(B, runtime="docker")
    wf = Workflow("stale")
    # The first attempt would run for a minute; a retry finishes at once.
    script = 'if [ "$TETHER_ATTEMPT" = 1 ]; then sleep 60; fi; ' + write_output({"ok": 1})
    wf.task("job", sh(script), image=BUSYBOX)
    client = mesh.client()
    run = client.submit(wf)
    mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
    assert run.status().tasks[0].node == A
    mesh.stop_agent(A, leave_running=True)
    # A's lease expires, the attempt is lost and retried on B, and succeeds there...
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED, final.message
    task = final.tasks[0]
    assert [(a.number, a.node, a.state) for a in task.attempts] == [
        (1, A, S.TASK_STATE_LOST),
        (2, B, S.TASK_STATE_SUCCEEDED),
    ]
    # ...while attempt 1's container still runs on A, where no agent watches it.
    assert containers_of(docker_api, run.id, **{"tether.attempt": "1"})[0]["State"] == "running"
    # A comes back and reports it: the controller has it killed, and it is removed.
    mesh.add_agent(A, runtime="docker")
    mesh.wait_for(
        lambda: not containers_of(docker_api, run.id, **{"tether.attempt": "1"}),
        mesh.config.cancel_grace + 8,
        "the stale attempt's container killed and removed",
    )
    after = client.get_run(run.id).tasks[0]
    assert [a.state for a in after.attempts] == [S.TASK_STATE_LOST, S.TASK_STATE_SUCCEEDED]
    assert after.outputs_json == task.outputs_json
