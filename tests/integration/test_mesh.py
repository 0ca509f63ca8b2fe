"""The spine end to end on real components: etcd process, gRPC servers on port 0, agents."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from etcd3aio import Etcd3Client, prefix_range_end
from helpers import Mesh, R, S, py

from tether.api.v1 import controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk import InvalidSpecError, NotFoundError, Workflow

WRITE_OUT = (
    "import json,os,time;inp=json.load(open(os.environ['TETHER_INPUTS_FILE']));"
    "time.sleep(0.3);"
    "json.dump({'name': os.environ['TETHER_TASK'], 'seen': sorted(inp['tasks']), "
    "'sum': 1 + sum(v['sum'] for v in inp['tasks'].values())}, "
    "open(os.environ['TETHER_OUTPUT_FILE'], 'w'))"
)


def diamond() -> Workflow:
    wf = Workflow("diamond")
    a = wf.task("a", py(WRITE_OUT), cpu=1)
    b = wf.task("b", py(WRITE_OUT), depends_on=[a], cpu=1)
    c = wf.task("c", py(WRITE_OUT), depends_on=[a], cpu=1)
    wf.task("d", py(WRITE_OUT), depends_on=[b, c], cpu=1)
    return wf


def test_node_registration_shows_resources_and_expires(mesh):
    mesh.add_agent(
        "gpu-node",
        fake_gpus="2",
        labels={"zone": "eu-1", "tier": "gold"},
        cpu=3.5,
        memory_bytes=6 * 2**30,
    )
    mesh.add_agent("cpu-node", cpu=2)
    client = mesh.client()
    nodes = {n.name: n for n in client.nodes()}
    assert set(nodes) == {"gpu-node", "cpu-node"}
    g = nodes["gpu-node"]
    assert g.capacity.cpu == 3.5
    assert g.capacity.memory_bytes == 6 * 2**30
    assert g.capacity.gpu == 2 and [x.index for x in g.gpus] == [0, 1]
    # The user's labels, and the GPU labels the agent adds by itself.
    assert dict(g.labels) == {
        "zone": "eu-1",
        "tier": "gold",
        "tether.io/gpu-model": "fake",
        "tether.io/gpu-memory": "16Gi",
    }
    assert g.runtime == "process" and g.lease_id != 0
    mesh.stop_agent("cpu-node")
    # Still listed until its lease (2 s in tests) expires, then gone.
    mesh.wait_for(lambda: {n.name for n in client.nodes()} == {"gpu-node"}, 10, "lease expiry")


def test_detected_resources_are_real(mesh):
    agent = mesh.add_agent("auto", cpu=0, memory_bytes=0)
    import os

    assert agent.capacity.cpu == len(os.sched_getaffinity(0))
    assert agent.capacity.memory_bytes > 2**30
    assert agent.capacity.gpu == 0  # no GPU here; TETHER_FAKE_GPUS is the test-only override


def test_diamond_runs_in_dependency_order_on_two_agents(mesh):
    mesh.add_agent("n1", cpu=1)
    mesh.add_agent("n2", cpu=1)
    client = mesh.client()
    run = client.submit(diamond())
    final = run.wait(timeout=60)
    assert final.state == R.RUN_STATE_SUCCEEDED, final
    tasks = {tk.spec.name: tk for tk in final.tasks}
    assert all(tk.state == S.TASK_STATE_SUCCEEDED for tk in tasks.values())

    def start(n):
        return tasks[n].started_at.ToNanoseconds()

    def end(n):
        return tasks[n].finished_at.ToNanoseconds()

    assert end("a") <= start("b") and end("a") <= start("c")
    assert end("b") <= start("d") and end("c") <= start("d")
    # b and c each need a whole node (cpu=1 on 1-cpu nodes): they ran on different nodes.
    assert {tasks["b"].node, tasks["c"].node} == {"n1", "n2"}
    assert start("b") < end("c") and start("c") < end("b"), "b and c should overlap"
    out = {n: json.loads(tk.outputs_json) for n, tk in tasks.items()}
    assert out["a"] == {"name": "a", "seen": [], "sum": 1}
    assert out["b"]["seen"] == ["a"] and out["b"]["sum"] == 2
    assert out["d"]["seen"] == ["b", "c"] and out["d"]["sum"] == 5
    assert run.outputs()["d"]["sum"] == 5


def test_records_are_in_etcd_under_the_prefix(mesh, etcd, prefix):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("stored")
    wf.task("only", py("print('hello')"))
    run = client.submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    mesh.call(mesh.controller.engine.committer.flushed())

    async def read():
        async with Etcd3Client([etcd.endpoint]) as c:
            resp = await c.kv.get(prefix + "/", range_end=prefix_range_end(prefix + "/"))
            return {kv.key.decode(): kv.value for kv in resp.kvs}

    kvs = asyncio.run(read())
    assert t.Node.FromString(kvs[f"{prefix}/nodes/n1"]).name == "n1"
    stored_run = t.Run.FromString(kvs[f"{prefix}/runs/{run.id}"])
    assert stored_run.state == R.RUN_STATE_SUCCEEDED and stored_run.workflow_name == "stored"
    stored_task = t.TaskRun.FromString(kvs[f"{prefix}/tasks/{run.id}/only"])
    assert stored_task.state == S.TASK_STATE_SUCCEEDED
    assert stored_task.stdout_tail == "hello\n"
    assert [a.number for a in stored_task.attempts] == [1]
    assert all(k.startswith(prefix + "/") for k in kvs)


@pytest.mark.parametrize(
    ("tasks", "field"),
    [
        ([("a", ["c"], 1), ("b", ["a"], 1), ("c", ["b"], 1)], "tasks[0] (a).depends_on: cycle"),
        ([("a", [], 1), ("b", ["ghost"], 1)], "tasks[1] (b).depends_on[0]: unknown task 'ghost'"),
        ([("a", [], 1), ("a", [], 1)], "tasks[1] (a).name: duplicate task name"),
        ([("a", [], -2)], "tasks[0] (a).resources.cpu: must be >= 0"),
    ],
)
def test_bad_specs_are_rejected_by_the_server_and_nothing_is_stored(
    mesh, etcd, prefix, tasks, field
):
    spec = t.WorkflowSpec(
        name="bad",
        tasks=[
            t.TaskSpec(name=n, command=["true"], depends_on=d, resources=t.Resources(cpu=c))
            for n, d, c in tasks
        ],
    )
    # Straight to the server (the SDK would refuse it before sending).
    with grpc.insecure_channel(mesh.address) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitWorkflow(controller_pb2.SubmitWorkflowRequest(spec=spec), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()

    async def count():
        async with Etcd3Client([etcd.endpoint]) as c:
            resp = await c.kv.get(
                prefix + "/runs/", range_end=prefix_range_end(prefix + "/runs/"), count_only=True
            )
            tasks_ = await c.kv.get(
                prefix + "/tasks/", range_end=prefix_range_end(prefix + "/tasks/"), count_only=True
            )
            return resp.count + tasks_.count

    assert asyncio.run(count()) == 0
    # The SDK raises the typed error, locally.
    with pytest.raises(InvalidSpecError):
        mesh.client().submit(spec)


def test_unknown_run_is_not_found(mesh):
    with pytest.raises(NotFoundError):
        mesh.client().get_run("nope")


def test_failed_task_fails_run_and_skips_dependents(mesh):
    mesh.add_agent("n1")
    wf = Workflow("fails")
    bad = wf.task("bad", py("import sys; print('boom', file=sys.stderr); sys.exit(3)"))
    wf.task("after", py("pass"), depends_on=[bad])
    wf.task("independent", py("pass"))
    final = mesh.client().submit(wf).wait(timeout=30)
    tasks = {tk.spec.name: tk for tk in final.tasks}
    assert final.state == R.RUN_STATE_FAILED
    assert tasks["bad"].state == S.TASK_STATE_FAILED
    assert tasks["bad"].exit_code == 3 and tasks["bad"].reason == "exit_code"
    assert "boom" in tasks["bad"].stderr_tail
    assert tasks["after"].state == S.TASK_STATE_SKIPPED
    assert tasks["independent"].state == S.TASK_STATE_SUCCEEDED


def test_task_no_node_can_hold_waits_with_a_reason(mesh):
    mesh.add_agent("small", cpu=1)
    wf = Workflow("too-big")
    wf.task("huge", py("pass"), cpu=64)
    client = mesh.client()
    run = client.submit(wf)
    mesh.wait_for(
        lambda: run.status().tasks[0].waiting_reason == "needs cpu=64; the best node has 1",
        10,
        "waiting reason",
    )
    assert run.status().tasks[0].state == S.TASK_STATE_READY
    client.cancel(run.id)
    assert run.wait(timeout=10).state == R.RUN_STATE_CANCELLED


def test_list_runs_pages_newest_first(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    ids = []
    for i in range(5):
        wf = Workflow(f"wf{i}")
        wf.task("x", py("pass"))
        ids.append(client.submit(wf).id)
    listed = [r.id for r in client.list_runs(page_size=2)]
    assert listed == list(reversed(ids))


def test_task_events_from_the_runtime_are_recorded(mesh):
    agent = mesh.add_agent("n1")
    real_start = agent.runtime.start

    async def start(spec):
        spec.on_event("pulling", f"pulling image for {spec.name}")
        return await real_start(spec)

    agent.runtime.start = start
    wf = Workflow("events")
    wf.task("x", py("pass"))
    final = mesh.client().submit(wf).wait(timeout=30)
    events = list(final.tasks[0].events)
    assert [(e.kind, e.attempt) for e in events] == [("pulling", 1)]
    assert events[0].message.startswith("pulling image for")


def test_health_and_reflection_for_grpcurl(mesh):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(mesh.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tether.v1.ControllerService", "tether.v1.AgentService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        services = {
            s.name
            for r in refl.ServerReflectionInfo(reqs, timeout=5)
            for s in r.list_services_response.service
        }
    assert {
        "tether.v1.ControllerService",
        "tether.v1.AgentService",
        "grpc.health.v1.Health",
    } <= services


def test_finished_runs_leave_memory_but_stay_readable(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("evicted")
    wf.task("x", py("print('kept')"))
    run = client.submit(wf)
    assert run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    mesh.wait_for(lambda: run.id not in mesh.controller.engine.runs, 5, "eviction")
    again = client.get_run(run.id)  # from etcd now
    assert again.state == R.RUN_STATE_SUCCEEDED and again.tasks[0].stdout_tail == "kept\n"
    from tether.sdk import FailedPreconditionError

    with pytest.raises(FailedPreconditionError):
        client.cancel(run.id)


def test_prometheus_metrics(etcd, prefix, tmp_path):
    import urllib.request

    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", metrics_listen="127.0.0.1:0")
    try:
        m.start_controller()
        m.add_agent("n1", cpu=3, fake_gpus="1")
        wf = Workflow("metered")
        a = wf.task("a", py("pass"))
        wf.task("b", py("raise SystemExit(1)"), depends_on=[a])
        assert m.client().submit(wf).wait(timeout=30).state == R.RUN_STATE_FAILED

        def scrape() -> str:
            url = f"http://127.0.0.1:{m.controller.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()

        m.wait_for(lambda: 'tether_node_cpu_capacity{node="n1"} 3.0' in scrape(), 5, "gauges")
        text = scrape()
        assert 'tether_tasks_finished_total{state="SUCCEEDED"} 1.0' in text
        assert 'tether_tasks_finished_total{state="FAILED"} 1.0' in text
        assert "tether_attempts_scheduled_total 2.0" in text
        assert "tether_schedule_latency_seconds_count 2.0" in text
        assert 'tether_node_gpus{node="n1"} 1.0' in text
        assert 'tether_node_connected{node="n1"} 1.0' in text
        assert "tether_leader 1.0" in text
    finally:
        m.close()


def test_finished_runs_are_deleted_after_the_retention(etcd, prefix, tmp_path):

    from tether.sdk import NotFoundError

    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", retention=1.0)
    try:
        m.start_controller()
        m.add_agent("n1")
        client = m.client()
        wf = Workflow("short-lived")
        wf.task("x", py("pass"))
        done = client.submit(wf, request_id="gc-me")
        assert done.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
        wf2 = Workflow("still-running")
        wf2.task("y", py("import time; time.sleep(30)"))
        running = client.submit(wf2)

        def gone():
            try:
                client.get_run(done.id)
            except NotFoundError:
                return True
            return False

        m.wait_for(gone, 15, "the finished run to be deleted")

        async def keys():
            async with Etcd3Client([etcd.endpoint]) as c:
                resp = await c.kv.get(
                    prefix + "/", range_end=prefix_range_end(prefix + "/"), keys_only=True
                )
                return [kv.key.decode() for kv in resp.kvs]

        left = asyncio.run(keys())
        assert not [k for k in left if done.id in k]
        assert any(running.id in k for k in left)  # unfinished runs are never collected
        assert client.get_run(running.id).state in (R.RUN_STATE_PENDING, R.RUN_STATE_RUNNING)
        again = client.submit(wf, request_id="gc-me")  # the request id is free again
        assert again.id != done.id and not again.existing
    finally:
        m.close()
