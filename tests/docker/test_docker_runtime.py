"""The docker runtime against a real engine: limits, OOM, exit codes, stop, logs, pulls, GPUs,
labels, removal and recovery. Images are local (tests/docker/build_images.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time

import docker
import pytest
from dockerutil import BUSYBOX, NODE_PREFIX, is_podman, launch_spec, managed_containers
from helpers import delete_as, nobody_uid

from tether.agent.config import AgentConfig
from tether.agent.runtimes.base import RuntimeError_
from tether.agent.runtimes.capped_log import truncation_note
from tether.agent.runtimes.containers import create_args
from tether.agent.runtimes.docker import DockerRuntime

NODE = NODE_PREFIX + "rt"


@pytest.fixture
def runtime(docker_api, busybox_image, tmp_path) -> DockerRuntime:
    return DockerRuntime(AgentConfig(node=NODE, runtime="docker", work_dir=tmp_path / "work"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def start_and_wait(rt: DockerRuntime, spec):
    handle = await rt.start(spec)
    return handle, await handle.wait()


def test_exit_code_logs_output_env_mount_and_labels(runtime, docker_api):
    wd = runtime.config.work_dir
    out = wd / "r1" / "t" / "1" / "output.json"
    script = (
        'echo to-stdout; echo to-stderr >&2; pwd; echo "tp=$TRACEPARENT"; '
        'echo \'{"answer": 42}\' > "$TETHER_OUTPUT_FILE"; exit 3'
    )
    spec = launch_spec(
        wd,
        ["sh", "-c", script],
        env={"TETHER_OUTPUT_FILE": runtime.task_path(out), "TRACEPARENT": "00-abc-def-01"},
        labels={"tether.node": NODE},
    )

    async def go():
        handle, status = await start_and_wait(runtime, spec)
        info = docker_api.inspect_container(handle.id)
        return handle, status, info

    handle, status, info = run(go())
    assert runtime.task_path(out) == "/tether/output.json"
    assert status.exit_code == 3 and status.reason == ""
    assert spec.stdout_path.read_text() == "to-stdout\n/tether\ntp=00-abc-def-01\n"
    assert spec.stderr_path.read_text() == "to-stderr\n"
    assert json.loads(out.read_text()) == {"answer": 42}  # written inside, read on the host
    labels = info["Config"]["Labels"]
    assert labels["tether.managed"] == "true" and labels["tether.node"] == NODE
    assert (labels["tether.run"], labels["tether.task"], labels["tether.attempt"]) == (
        "r1",
        "t",
        "1",
    )
    assert info["Name"] == "/tether-r1-t-1"
    # Removed on request, and removing again is fine.
    run(handle.remove())
    run(handle.remove())
    with pytest.raises(docker.errors.NotFound):
        docker_api.inspect_container(handle.id)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("agent_user", ["nobody", "root"])
def test_what_a_root_container_makes_stays_deletable_by_a_non_root_agent(runtime, agent_user):
    # The agent's uid as the runtime sees it: "root" takes no ACL, as a root agent needs none;
    # its attempt is then the control, where the same user cannot delete what it finds.
    runtime.owner_uid = nobody_uid() if agent_user == "nobody" else 0
    wd = runtime.config.work_dir
    spec = launch_spec(
        wd, ["sh", "-c", "mkdir -p /tether/out/deep && echo x > /tether/out/deep/model.bin"]
    )
    _, status = run(start_and_wait(runtime, spec))
    assert status.exit_code == 0
    assert (spec.attempt_dir / "out" / "deep" / "model.bin").read_text() == "x\n"
    assert delete_as(spec.attempt_dir, "out") is (agent_user == "nobody")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_the_engine_deletes_what_a_root_container_shut_the_agent_out_of(runtime, docker_api):
    # A directory with an explicit narrow mode (as tar extracts them) escapes the default ACL:
    # a non-root agent cannot empty it, so the runtime does, as root, in a container.
    runtime.owner_uid = nobody_uid()
    wd = runtime.config.work_dir
    script = "mkdir -m 755 /tether/strict && echo x > /tether/strict/f && chmod 700 /tether/strict"
    spec = launch_spec(wd, ["sh", "-c", script])
    attempt = spec.attempt_dir
    spec = dataclasses.replace(spec, attempt_dir=str(attempt))  # as the runner passes it
    _, status = run(start_and_wait(runtime, spec))
    assert status.exit_code == 0
    assert not delete_as(attempt, "strict")
    record = attempt.with_name("1.image")
    assert record.read_text() == BUSYBOX  # the run's image, where its container cannot write

    # The run's images, the latest first: one without ``rm`` (skipped), then one whose
    # declared user is not root (its rm runs as root all the same).
    docker_api.import_image_from_data(_EMPTY_TAR, repository="tether-test/empty")
    holder = docker_api.create_container(BUSYBOX, command=["true"])["Id"]
    docker_api.commit(holder, repository="tether-test/busybox-nobody", changes=["USER 65534"])
    docker_api.remove_container(holder, force=True)
    record.write_text("tether-test/busybox-nobody:latest")
    newer = record.with_name("0.image")
    newer.write_text("tether-test/empty:latest")
    os.utime(record, (time.time() - 60, time.time() - 60))
    tried: list[str] = []
    real = runtime._remove_with

    def remove_with(api, image, *args):
        tried.append(image)
        return real(api, image, *args)

    runtime._remove_with = remove_with
    run_dir = wd / "r1"
    try:
        assert run(runtime.remove_tree(run_dir)) is True
    finally:
        for image in ("tether-test/empty:latest", "tether-test/busybox-nobody:latest"):
            with contextlib.suppress(docker.errors.APIError):
                docker_api.remove_image(image, force=True)
    assert tried == ["tether-test/empty:latest", "tether-test/busybox-nobody:latest"]
    # The run directory's entries went; the directory itself is the agent's to delete.
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []
    assert docker_api.containers(all=True, filters={"label": f"tether.cleanup={NODE}"}) == []

    # A cleanup container an agent left when it died is removed by the next one's recovery.
    docker_api.create_container(BUSYBOX, command=["true"], labels={"tether.cleanup": NODE})
    recovered = run(runtime.recover())
    assert [r.labels.get("tether.run") for r in recovered] == ["r1"]  # the task's, not it
    assert docker_api.containers(all=True, filters={"label": f"tether.cleanup={NODE}"}) == []

    runtime.owner_uid = 0  # a root agent needs no help, and gets none
    (run_dir / "again").mkdir()
    assert run(runtime.remove_tree(run_dir)) is False
    assert (run_dir / "again").is_dir()


# A tar archive with nothing in it (two zero blocks): an image without a single program.
_EMPTY_TAR = bytes(1024)


def _cgroup_limits() -> str:
    # cgroup v2 files, or their v1 equivalents, whichever the engine's host has.
    cg = "/sys/fs/cgroup"
    return (
        f"if [ -f {cg}/cpu.max ]; then cat {cg}/cpu.max {cg}/memory.max; else"
        f" echo $(cat {cg}/cpu/cpu.cfs_quota_us) $(cat {cg}/cpu/cpu.cfs_period_us);"
        f" cat {cg}/memory/memory.limit_in_bytes; fi"
    )


def test_cpu_and_memory_limits_apply_inside_the_container(runtime, docker_api):
    spec = launch_spec(
        runtime.config.work_dir,
        ["sh", "-c", _cgroup_limits()],
        cpu=0.5,
        memory_bytes=96 * 2**20,
    )

    async def go():
        handle, status = await start_and_wait(runtime, spec)
        return status, docker_api.inspect_container(handle.id)

    status, info = run(go())
    assert status.exit_code == 0
    quota, period, memory = spec.stdout_path.read_text().split()
    assert int(quota) / int(period) == 0.5
    assert int(memory) == 96 * 2**20
    assert info["HostConfig"]["NanoCpus"] == 500_000_000
    assert info["HostConfig"]["Memory"] == 96 * 2**20


def test_oom_kill_is_reported_as_oom(runtime):
    # busybox tail keeps the last "line" of /dev/zero, which never ends: memory grows.
    spec = launch_spec(runtime.config.work_dir, ["tail", "/dev/zero"], memory_bytes=16 * 2**20)
    _, status = run(start_and_wait(runtime, spec))
    assert status.reason == "oom", status
    assert status.exit_code == 137
    assert "out of memory" in status.message and "16.0 MiB" in status.message


def test_stop_is_sigterm_then_sigkill_after_the_grace(runtime):
    wd = runtime.config.work_dir

    async def go():
        polite = await runtime.start(launch_spec(wd, ["sleep", "30"], task="polite"))
        # Ignores SIGTERM: only the SIGKILL after the grace period ends it.
        stubborn = await runtime.start(
            launch_spec(wd, ["sh", "-c", "trap '' TERM; sleep 30 & wait"], task="stubborn")
        )
        await asyncio.sleep(0.3)  # let the shell install its trap
        t0 = time.monotonic()
        await polite.stop(5.0)
        polite_took = time.monotonic() - t0
        t0 = time.monotonic()
        await stubborn.stop(1.0)
        stubborn_took = time.monotonic() - t0
        return polite_took, await polite.wait(), stubborn_took, await stubborn.wait()

    polite_took, polite, stubborn_took, stubborn = run(go())
    assert polite_took < 2.0, "SIGTERM reaches the task through the container's init"
    assert polite.exit_code == 143  # 128 + SIGTERM
    assert 0.9 <= stubborn_took < 4.0
    assert stubborn.exit_code == 137  # 128 + SIGKILL


def test_logs_are_capped(docker_api, busybox_image, tmp_path):
    rt = DockerRuntime(AgentConfig(node=NODE, runtime="docker", work_dir=tmp_path / "w"))
    events = []
    spec = launch_spec(
        rt.config.work_dir,
        ["sh", "-c", "yes tether | head -c 100000; echo e >&2"],
        log_limit_bytes=1000,
        on_event=lambda kind, message: events.append((kind, message)),
    )
    _, status = run(start_and_wait(rt, spec))
    assert status.exit_code == 0
    text = spec.stdout_path.read_text()
    note = truncation_note(1000).decode()
    assert text.startswith("tether\ntether\n") and text.endswith(note)
    assert len(text) == 1000 + len(note)
    assert events == [
        ("log_truncated", "stdout reached the log limit of 1000 bytes; the rest was discarded")
    ]
    assert spec.stderr_path.read_text() == "e\n"


def test_logs_are_whole_when_a_container_exits_while_writing(runtime):
    # A follower can miss an exiting container's last writes; the file must not.
    async def go():
        specs = [
            launch_spec(
                runtime.config.work_dir,
                ["sh", "-c", "yes tether | head -c 200000; echo end"],
                task=f"t{i}",
            )
            for i in range(4)
        ]
        handles = [await runtime.start(s) for s in specs]
        await asyncio.gather(*(h.wait() for h in handles))
        return [s.stdout_path.stat().st_size for s in specs]

    assert run(go()) == [200004] * 4


def test_pull_policies_and_image_failures(runtime, docker_api):
    wd = runtime.config.work_dir
    events: list[tuple[str, str]] = []

    def spec(task, **kw):
        return launch_spec(
            wd, ["true"], task=task, on_event=lambda k, m: events.append((k, m)), **kw
        )

    async def fails(s) -> RuntimeError_:
        with pytest.raises(RuntimeError_) as e:
            await runtime.start(s)
        return e.value

    async def go():
        # Present locally: if-not-present (the default) and never start without pulling.
        for i, policy in enumerate(("", "if-not-present", "never")):
            _, status = await start_and_wait(runtime, spec(f"ok{i}", image_pull_policy=policy))
            assert status.exit_code == 0
        assert events == []
        never = await fails(spec("never", image="tether-test/absent:1", image_pull_policy="never"))
        missing = await fails(spec("missing", image="tether-test/absent:1"))
        always = await fails(spec("always", image_pull_policy="always"))
        no_image = await fails(spec("none", image=""))
        return never, missing, always, no_image

    never, missing, always, no_image = run(go())
    assert never.reason == "image" and "pull policy is never" in str(never)
    # No registry is reachable here: the engine's own message is passed on.
    assert missing.reason == "image" and "tether-test/absent:1" in str(missing)
    assert always.reason == "image" and BUSYBOX in str(always)
    assert no_image.reason == "image"
    assert ("pulling", "pulling image tether-test/absent:1") in events
    assert ("pulling", f"pulling image {BUSYBOX}") in events
    assert not any(kind == "pulled" for kind, _ in events)
    # Nothing is left behind by attempts that never started.
    names = {
        c["Labels"]["tether.task"] for c in managed_containers(docker_api, **{"tether.node": NODE})
    }
    assert names == {"ok0", "ok1", "ok2"}


def test_gpu_device_requests_reach_the_engine(runtime, docker_api):
    """No GPU here: the request is built and stored by the engine, which then refuses to start
    the container without the NVIDIA runtime; the runtime reports that and cleans up."""
    if is_podman(docker_api):
        pytest.skip("Podman's Docker API ignores device requests (Podman uses CDI for GPUs)")
    env = {"CUDA_VISIBLE_DEVICES": "1,3", "NVIDIA_VISIBLE_DEVICES": "1,3"}
    spec = launch_spec(runtime.config.work_dir, ["true"], gpu_indices=[1, 3], env=env)
    container, host = create_args(spec, NODE)
    created = docker_api.create_container(
        **dict(container, name=None), host_config=docker_api.create_host_config(**host)
    )
    try:
        info = docker_api.inspect_container(created["Id"])
    finally:
        docker_api.remove_container(created["Id"], force=True)
    [request] = info["HostConfig"]["DeviceRequests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == ["1", "3"]
    assert request["Capabilities"] == [["gpu"]]
    assert "CUDA_VISIBLE_DEVICES=1,3" in info["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=1,3" in info["Config"]["Env"]

    with pytest.raises(RuntimeError_) as e:
        run(runtime.start(spec))
    assert "nvidia" in str(e.value)
    assert managed_containers(docker_api, **{"tether.node": NODE}) == []


def test_recover_finds_running_and_ended_containers_and_rewrites_their_logs(
    runtime, docker_api, tmp_path
):
    wd = runtime.config.work_dir
    slow = launch_spec(wd, ["sh", "-c", "echo begun; sleep 1.5; echo ended"], task="slow")
    quick = launch_spec(wd, ["sh", "-c", "echo quick; exit 4"], task="quick")

    async def go():
        s = await runtime.start(slow)
        q = await runtime.start(quick)
        await q.wait()
        # A new agent on this node: a new runtime with the same node name and work dir.
        again = DockerRuntime(AgentConfig(node=NODE, runtime="docker", work_dir=wd))
        slow.stdout_path.write_text("")  # lost with the old agent; the engine still has it
        found = {r.labels["tether.task"]: r for r in await again.recover()}
        other = DockerRuntime(AgentConfig(node=NODE + "x", runtime="docker", work_dir=wd))
        assert await other.recover() == []  # another node's agent sees none of them
        results = {name: await r.handle.wait() for name, r in found.items()}
        await s.wait()
        return found, results

    found, results = run(go())
    assert set(found) == {"slow", "quick"}
    assert found["slow"].running and not found["quick"].running
    assert abs(found["slow"].started_at - time.time()) < 30
    assert results["quick"].exit_code == 4 and results["slow"].exit_code == 0
    assert slow.stdout_path.read_text() == "begun\nended\n"
    assert quick.stdout_path.read_text() == "quick\n"
