"""The scheduler on a real mesh (etcd, gRPC, agents with fake GPUs via the test-only
TETHER_FAKE_GPUS setting): policies, GPU nodes kept free, selectors and reasons, gangs with
their environment, preemption, learned durations."""

from __future__ import annotations

import json

from helpers import Mesh, R, S, by_name, etcd_dump, py, tether

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

SLEEP = "import time; time.sleep({})"


def nodes_of(run) -> dict[str, str]:
    return {k: v.node for k, v in by_name(run.wait(timeout=30)).items()}


def test_spread_and_binpack_place_as_they_should(mesh):
    mesh.add_agent("node-a", cpu=4)
    mesh.add_agent("node-b", cpu=4)
    client = mesh.client()
    for policy, expect in (("spread", {"node-a", "node-b"}), ("binpack", {"node-a"})):
        wf = Workflow(f"two-{policy}", policy=policy)
        wf.task("x", py(SLEEP.format(0.5)), cpu=1)
        wf.task("y", py(SLEEP.format(0.5)), cpu=1)
        run = client.submit(wf)
        assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        assert set(nodes_of(run).values()) == expect, policy


def test_the_controllers_policy_applies_to_workflows_naming_none(mesh):
    mesh.stop_controller()
    mesh.start_controller(policy="binpack")
    mesh.add_agent("node-a", cpu=4)
    mesh.add_agent("node-b", cpu=4)
    wf = Workflow("pack")
    for i in range(3):
        wf.task(f"t{i}", py(SLEEP.format(0.5)), cpu=1)
    run = mesh.client().submit(wf)
    assert set(nodes_of(run).values()) == {"node-a"}


def test_gpu_nodes_are_kept_for_gpu_tasks(mesh):
    mesh.add_agent("gpu-node", cpu=8, fake_gpus="1")
    mesh.add_agent("node-a", cpu=2)
    mesh.add_agent("node-b", cpu=2)
    wf = Workflow("six-small")
    for i in range(6):
        wf.task(f"t{i}", py(SLEEP.format(0.5)), cpu=0.5)
    wf.task("needs-gpu", py("pass"), gpu=1)
    placed = nodes_of(mesh.client().submit(wf))
    assert placed.pop("needs-gpu") == "gpu-node"
    assert "gpu-node" not in placed.values()


def test_a_selector_lands_on_the_right_node_and_waits_with_a_reason(mesh):
    mesh.add_agent("h100-node", fake_gpus="h100:80Gi")
    mesh.add_agent("a100-node", fake_gpus="a100:40Gi")
    client = mesh.client()
    wf = Workflow("pick-a100")
    wf.task("one", py("pass"), gpu=1, node_selector={"gpu-model": "a100"})
    assert nodes_of(client.submit(wf)) == {"one": "a100-node"}

    wf = Workflow("two-a100")
    wf.task("two", py("pass"), gpu=2, node_selector={"gpu-model": "a100"})
    run = client.submit(wf)
    why = "needs 2 GPUs with gpu-model=a100; the best node has 1"
    mesh.wait_for(lambda: run.status().tasks[0].waiting_reason == why, 10, "reason")
    assert run.status().tasks[0].state == S.TASK_STATE_READY
    res = tether("status", run.id, controller=mesh.address)
    assert res.returncode == 0 and why in res.stdout, res.stdout
    res = tether("nodes", controller=mesh.address)
    assert "0/1, 1 free" in res.stdout and "tether.io/gpu-model=a100" in res.stdout, res.stdout
    # A fitting node joins: the task starts there.
    mesh.add_agent("big-a100", fake_gpus="a100:40Gi,a100:40Gi")
    assert nodes_of(run) == {"two": "big-a100"}
    assert run.status().state == R.RUN_STATE_SUCCEEDED


def test_required_affinity_filters_nodes(mesh):
    mesh.add_agent("z1", labels={"zone": "eu-1"})
    mesh.add_agent("z2", labels={"zone": "us-1"})
    wf = Workflow("aff")
    for i in range(3):
        wf.task(f"t{i}", py("pass"), affinity=["zone NotIn [eu-1]"])
    assert set(nodes_of(mesh.client().submit(wf)).values()) == {"z2"}


GANG = (
    "import json, os, pathlib, sys, time\n"
    "d = pathlib.Path(sys.argv[1]); i = os.environ['TETHER_REPLICA_INDEX']\n"
    "keys = ['TETHER_REPLICA_INDEX', 'TETHER_REPLICAS', 'TETHER_MASTER_ADDR', "
    "'TETHER_MASTER_PORT', 'TETHER_ATTEMPT']\n"
    "(d / f'{os.environ[\"TETHER_ATTEMPT\"]}-{i}').write_text("
    "json.dumps({k: os.environ[k] for k in keys}))\n"
    "other = d / f'{os.environ[\"TETHER_ATTEMPT\"]}-{1 - int(i)}'\n"
    "fail = len(sys.argv) > 2 and os.environ['TETHER_ATTEMPT'] == '1' and i == '1'\n"
    "if fail: sys.exit(3)\n"
    "deadline = time.time() + (30 if len(sys.argv) > 2 else 10)\n"
    "while not other.exists():\n"
    "    assert time.time() < deadline, 'the other replica never started'\n"
    "    time.sleep(0.05)\n"
    "if len(sys.argv) > 2 and os.environ['TETHER_ATTEMPT'] == '1': time.sleep(30)\n"
)


def test_a_gang_on_two_one_slot_nodes_gets_its_env_and_starts_together(mesh, tmp_path):
    mesh.add_agent("n1", max_tasks=1, address="10.0.0.1")
    mesh.add_agent("n2", max_tasks=1, address="10.0.0.2")
    wf = Workflow("gang")
    wf.task("train", [*py(GANG), str(tmp_path)], replicas=2)
    run = mesh.client().submit(wf)
    done = run.wait(timeout=30)
    assert done.state == R.RUN_STATE_SUCCEEDED, done
    envs = [json.loads((tmp_path / f"1-{i}").read_text()) for i in (0, 1)]
    assert [e["TETHER_REPLICA_INDEX"] for e in envs] == ["0", "1"]
    assert {e["TETHER_REPLICAS"] for e in envs} == {"2"}
    task = done.tasks[0]
    master = {"n1": "10.0.0.1", "n2": "10.0.0.2"}[task.replicas[0].node]
    assert {e["TETHER_MASTER_ADDR"] for e in envs} == {master}
    (port,) = {e["TETHER_MASTER_PORT"] for e in envs}
    assert 0 < int(port) < 65536
    assert sorted(r.node for r in task.replicas) == ["n1", "n2"]
    assert [r.state for r in task.replicas] == [S.TASK_STATE_SUCCEEDED] * 2


def test_one_replica_failing_stops_the_other_and_the_gang_is_retried_whole(mesh, tmp_path):
    mesh.add_agent("n1", max_tasks=1)
    mesh.add_agent("n2", max_tasks=1)
    wf = Workflow("gang-retry")
    wf.task("train", [*py(GANG), str(tmp_path), "fail-once"], replicas=2, retries=1)
    run = mesh.client().submit(wf)
    done = run.wait(timeout=30)
    assert done.state == R.RUN_STATE_SUCCEEDED, done
    task = done.tasks[0]
    # Replica 0 of attempt 1 slept 30 s: it was stopped, not waited for.
    assert task.attempt == 2
    assert task.attempts[0].state == S.TASK_STATE_FAILED
    assert "replica 1" in task.attempts[0].message
    assert (tmp_path / "2-0").exists() and (tmp_path / "2-1").exists()


def test_a_gang_that_can_never_fit_stays_ready_with_a_reason(mesh):
    mesh.add_agent("only", cpu=2)
    wf = Workflow("gang-too-big")
    wf.task("train", py("pass"), replicas=2, cpu=1)
    run = mesh.client().submit(wf)
    mesh.wait_for(
        lambda: "gang of 2 replicas" in run.status().tasks[0].waiting_reason, 10, "reason"
    )
    assert run.status().tasks[0].state == S.TASK_STATE_READY
    mesh.client().cancel(run.id)


def test_a_high_priority_task_preempts_a_preemptible_one(mesh):
    mesh.add_agent("solo", cpu=1)
    client = mesh.client()
    low = Workflow("low")
    low.task(
        "batch",
        py("import os, time; time.sleep(60 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"),
        cpu=1,
        priority=10,
        preemptible=True,
    )
    low_run = client.submit(low)
    mesh.wait_for(
        lambda: low_run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "low running"
    )
    high = Workflow("high")
    high.task("urgent", py("pass"), cpu=1, priority=90)
    high_run = client.submit(high)
    assert high_run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    done = low_run.wait(timeout=30)
    assert done.state == R.RUN_STATE_SUCCEEDED  # retried although `retries` is 0
    batch = done.tasks[0]
    first = batch.attempts[0]
    assert first.state == S.TASK_STATE_PREEMPTED and first.reason == "preempted"
    assert f"preempted by urgent of run {high_run.id} (priority 90)" == first.message
    assert batch.preempted_attempts == 1 and batch.attempt == 2
    # The preemptor ran while the victim waited: it finished before the victim's retry.
    urgent = high_run.status().tasks[0]
    assert urgent.finished_at.ToNanoseconds() <= batch.attempts[1].scheduled_at.ToNanoseconds()


def test_no_preemption_without_preemptible(mesh):
    mesh.add_agent("solo", cpu=1)
    client = mesh.client()
    low = Workflow("low-fixed")
    low.task("batch", py(SLEEP.format(1.5)), cpu=1, priority=0)
    low_run = client.submit(low)
    mesh.wait_for(
        lambda: low_run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "low running"
    )
    high = Workflow("high")
    high.task("urgent", py("pass"), cpu=1, priority=100)
    high_run = client.submit(high)
    assert low_run.wait(timeout=30).tasks[0].attempt == 1
    assert high_run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED


def test_durations_are_learned_per_workflow_and_task(mesh, etcd, prefix):
    mesh.add_agent("n1")
    wf = Workflow("learn me")
    wf.task("slow", py(SLEEP.format(0.4)))
    wf.task("fast", py("pass"))
    assert mesh.client().submit(wf).wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    key = f"{prefix}/durations/learn%20me".encode()

    def learned():
        raw = etcd_dump(etcd.endpoint, prefix).get(key)
        return dict(t.LearnedDurations.FromString(raw).seconds) if raw else None

    mesh.wait_for(lambda: learned() is not None and len(learned()) == 2, 10, "durations written")
    got = learned()
    assert got["slow"] >= 0.4 and got["fast"] < got["slow"]


def test_a_high_priority_task_is_not_held_back_by_a_long_ready_queue(etcd, prefix, tmp_path):
    # A window of 2: with 8 tasks waiting, a pass plans only the oldest two, except that
    # tasks above the default priority always join the first window.
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", schedule_window=2)
    mesh.start_controller()
    try:
        mesh.add_agent("solo", cpu=1)
        client = mesh.client()
        queue = Workflow("queue")
        for i in range(8):
            queue.task(f"q{i}", py(SLEEP.format(0.3)), cpu=1, priority=20)
        queued = client.submit(queue)
        mesh.wait_for(
            lambda: any(tk.state == S.TASK_STATE_RUNNING for tk in queued.status().tasks),
            10,
            "the queue under way",
        )
        high = Workflow("high")
        high.task("urgent", py("pass"), cpu=1, priority=90)
        high_run = client.submit(high)
        assert high_run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        urgent_at = high_run.status().tasks[0].attempts[0].scheduled_at.ToNanoseconds()
        done = queued.wait(timeout=60)
        assert done.state == R.RUN_STATE_SUCCEEDED
        later = [
            tk.spec.name
            for tk in done.tasks
            if tk.attempts[0].scheduled_at.ToNanoseconds() > urgent_at
        ]
        # At most one queued task was placed after it was submitted before it: it went next.
        assert len(later) >= 6, later
    finally:
        mesh.close()
