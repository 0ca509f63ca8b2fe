"""The docker runtime: a container does not reach host files outside its attempt directory
through the files the agent reads and writes there for it, nor freeze the agent with a FIFO;
a container created but never started is not reported as a success."""

from __future__ import annotations

import json

from dockerutil import BUSYBOX, NODE_PREFIX
from helpers import S

from tether.sdk import Workflow

A = NODE_PREFIX + "a"


def test_a_container_cannot_read_host_files_through_its_log_or_output_files(
    mesh, tmp_path, busybox_image
):
    """The attempt directory is the container's (bind-mounted rw at /tether). A container
    that replaces stdout.log / output.json with symlinks to host paths has the agent, on
    the host and with the agent's privileges, follow them: tail() sends the host file as
    the stdout tail, read_output() as the task's outputs."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST SECRET\n")
    secret_json = tmp_path / "host-secret.json"
    secret_json.write_text(json.dumps({"host": "secret"}))
    mesh.add_agent(A, runtime="docker")
    wf = Workflow("escape-read")
    script = (
        "echo hi; sleep 0.5; "
        f"rm -f /tether/stdout.log; ln -s {secret} /tether/stdout.log; "
        f"ln -s {secret_json} /tether/output.json"
    )
    wf.task("peek", ["sh", "-c", script], image=BUSYBOX)
    final = mesh.client().submit(wf).wait(timeout=60)
    tk = final.tasks[0]
    # Checked together, reported apart: either is a read of a host file.
    leaks = []
    if "HOST SECRET" in tk.stdout_tail:
        leaks.append(f"stdout_tail={tk.stdout_tail!r}")
    if "secret" in tk.outputs_json:
        leaks.append(f"outputs_json={tk.outputs_json!r}")
    assert not leaks, leaks


def test_a_container_cannot_truncate_a_host_file_through_its_log_file(
    mesh, tmp_path, busybox_image
):
    """The log follower writes stderr.log on the host. Once the container exits it opens the
    file again (finish(): "wb" when nothing was written yet, else "ab"), following a symlink
    the container put there: a host file (as the agent's user, often root) is emptied."""
    victim = tmp_path / "host-file.txt"
    victim.write_text("precious host data\n")
    mesh.add_agent(A, runtime="docker")
    wf = Workflow("escape-write")
    script = f"sleep 0.5; rm -f /tether/stderr.log; ln -s {victim} /tether/stderr.log"
    wf.task("clobber", ["sh", "-c", script], image=BUSYBOX)
    final = mesh.client().submit(wf).wait(timeout=60)
    assert final.tasks[0].state == S.TASK_STATE_SUCCEEDED
    assert victim.read_text() == "precious host data\n"


def test_a_container_cannot_freeze_the_agent_with_a_fifo_as_its_output_file(
    mesh, tmp_path, busybox_image
):
    """read_output() stats output.json (a FIFO is 0 bytes) and opens it on the event loop:
    the open blocks until someone writes, so the whole agent (heartbeats, every other
    attempt) stops; the controller then declares the node lost and the attempt is retried,
    again and again on any docker node the image reaches."""
    import os
    import time

    from helpers import agent_process

    work = tmp_path / "agent"
    proc = agent_process(mesh.address, A, work, "--runtime", "docker", log=tmp_path / "agent.log")
    try:
        client = mesh.client()
        mesh.wait_for(lambda: any(n.name == A for n in client.nodes()), 20, "agent registered")
        wf = Workflow("fifo")
        wf.task("fifo", ["sh", "-c", "mkfifo /tether/output.json"], image=BUSYBOX)
        run = client.submit(wf)
        deadline = time.monotonic() + 15
        task = None
        while time.monotonic() < deadline:
            task = run.status().tasks[0]
            if task.state in (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED):
                break
            time.sleep(0.2)
        assert task is not None
        frozen = task.state not in (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED)
        if frozen:
            # Let the agent go on: a writer opens the FIFO, the agent's open() returns.
            for fifo in work.glob("*/fifo/*/output.json"):
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        assert not frozen, (
            f"the attempt never ended (state {S.Name(task.state)}, attempt {task.attempt}, "
            f"{task.message!r}): the agent's loop was blocked"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except Exception:
            proc.kill()
            proc.wait(5)


def test_a_container_created_but_never_started_is_not_reported_as_succeeded(
    etcd, prefix, tmp_path, docker_api, busybox_image, monkeypatch
):
    """An agent that dies between the engine's create and start (the window docker._create
    itself mentions) leaves a container in state "created". The next agent's recover() takes
    it for ended (not Running); the engine's wait on a never-started container returns at
    once with StatusCode 0, so the attempt is reported SUCCEEDED with an empty output
    although its command never ran."""
    import threading

    import docker as docker_sdk
    from helpers import Mesh

    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=5)
    m.start_controller()
    release = threading.Event()
    try:
        started: list[str] = []
        real_start = docker_sdk.APIClient.start

        def dying_start(self, container, *a, **kw):
            # The agent "dies" here: the container was created, never started.
            started.append(container)
            release.wait(30)

        monkeypatch.setattr(docker_sdk.APIClient, "start", dying_start)
        m.add_agent(A, runtime="docker")
        wf = Workflow("never-started")
        wf.task(
            "t",
            ["sh", "-c", "touch /tether/ran; echo '{\"ran\": true}' > /tether/output.json"],
            image=BUSYBOX,
        )
        client = m.client()
        run = client.submit(wf)
        m.wait_for(lambda: started, 20, "the container created")
        m.stop_agent(A, leave_running=True)  # as if it had died at that point
        release.set()
        monkeypatch.setattr(docker_sdk.APIClient, "start", real_start)
        m.add_agent(A, runtime="docker")  # same name, same work dir: recovers
        final = run.wait(timeout=30)
        tk = final.tasks[0]
        ran = any((tmp_path / "agents").glob("*/*/t/1/ran"))
        assert not (tk.state == S.TASK_STATE_SUCCEEDED and not ran), (
            f"reported {S.Name(tk.state)} (exit {tk.exit_code}, outputs {tk.outputs_json!r}) "
            "for a command that never ran"
        )
    finally:
        release.set()
        m.close()
