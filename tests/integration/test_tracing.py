"""One run is one trace: controller and agent spans reach a real OTLP/gRPC receiver as one tree."""

from __future__ import annotations

import json
import signal
import sys
import threading
from concurrent import futures

import grpc
import pytest
from helpers import Mesh, R, S, agent_process, by_name, tether, wait_for
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tether.api.v1 import types_pb2 as t
from tether.controller.etcd_process import free_port
from tether.sdk import Secret, Workflow
from tether.sdk.errors import TetherError


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver(monkeypatch):
    """A real OTLP/gRPC collector on a free port, with every process told to export to it."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield receiver
    server.stop(0)


def _names(receiver: Receiver) -> list[str]:
    with receiver.lock:
        return [s.name for _, s in receiver.spans]


def _check_one_tree(spans, root_name: str):
    """One trace id, one root (named ``root_name``), every parent in the trace: the root."""
    trace_ids = {s.trace_id for _, s in spans}
    assert len(trace_ids) == 1, "every span of the run shares one trace id"
    by_id = {s.span_id: s for _, s in spans}
    roots = [s for _, s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == [root_name]
    for _, s in spans:
        if s.parent_span_id:
            assert s.parent_span_id in by_id, f"{s.name} has a parent that is not in the trace"
    return roots[0]


def test_one_run_is_one_trace_across_controller_and_agent(etcd, prefix, tmp_path, receiver):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        wf = Workflow("traced")
        code = (
            "import os,json;json.dump({'tp': os.environ['TRACEPARENT']},"
            "open(os.environ['TETHER_OUTPUT_FILE'],'w'))"
        )
        a = wf.task("a", [sys.executable, "-c", code])
        wf.task("b", [sys.executable, "-c", code], depends_on=[a])
        final = mesh.client().submit(wf).wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        traceparents = {tk.spec.name: json.loads(tk.outputs_json)["tp"] for tk in final.tasks}
        names_wanted = {
            "run traced",
            "submit traced",
            "schedule a",
            "schedule b",
            "dispatch a",
            "dispatch b",
            "run a",
            "run b",
            "record a",
            "record b",
            "wait",
            "outputs",
        }
        mesh.wait_for(lambda: names_wanted <= set(_names(receiver)), 15, "spans exported")
    finally:
        mesh.close()

    spans = receiver.spans
    root = _check_one_tree(spans, "run traced")
    # The root spans the whole run, from the stored submit time to the stored end.
    assert root.start_time_unix_nano == final.created_at.ToNanoseconds()
    assert root.end_time_unix_nano == final.finished_at.ToNanoseconds()
    services = {svc for svc, _ in spans}
    assert services == {"tether-controller", "tether-agent"}
    named = {s.name: (svc, s) for svc, s in spans}
    assert named["submit traced"][1].parent_span_id == root.span_id
    for task in ("a", "b"):
        svc, run_span = named[f"run {task}"]
        assert svc == "tether-agent"
        dispatch = named[f"dispatch {task}"][1]
        assert run_span.parent_span_id == dispatch.span_id
        assert dispatch.parent_span_id == root.span_id
        schedule = named[f"schedule {task}"][1]
        assert schedule.parent_span_id == root.span_id
        attrs = {a.key: a.value for a in schedule.attributes}
        assert attrs["tether.policy"].string_value == "critical-path"  # the default
        assert attrs["tether.node"].string_value == "n1"
        # The task process got TRACEPARENT pointing at the agent's run span.
        _version, trace_hex, span_hex, _ = traceparents[task].split("-")
        assert bytes.fromhex(trace_hex) == run_span.trace_id
        assert bytes.fromhex(span_hex) == run_span.span_id
    # The attempt's steps are children of the agent's run span.
    run_span_ids = {named["run a"][1].span_id, named["run b"][1].span_id}
    steps = [s for _, s in spans if s.name in ("stage", "process start", "wait", "outputs")]
    assert len(steps) == 8
    assert all(s.parent_span_id in run_span_ids for s in steps)


# The task's own work, traced with the OpenTelemetry SDK from its TRACEPARENT; it waits for
# a file so the test can restart the controller while it runs.
_TRACED_TASK = """
import json, os, pathlib, sys, time
go = pathlib.Path(sys.argv[1])
deadline = time.time() + 30
while not go.exists() and time.time() < deadline:
    time.sleep(0.05)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
provider = TracerProvider(resource=Resource.create({"service.name": "task"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
ctx = TraceContextTextMapPropagator().extract({"traceparent": os.environ["TRACEPARENT"]})
with provider.get_tracer("task").start_as_current_span("task work", context=ctx):
    time.sleep(0.05)
provider.shutdown()
json.dump({"ok": True}, open(os.environ["TETHER_OUTPUT_FILE"], "w"))
"""


def test_a_run_with_a_retry_and_a_controller_restart_is_one_trace(etcd, prefix, tmp_path, receiver):
    go = tmp_path / "go"
    port = free_port()
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        mesh.add_agent("n1")
        wf = Workflow("restarted")
        flaky = wf.task(
            "flaky",
            [
                sys.executable,
                "-c",
                "import os,sys; sys.exit(3 if os.environ['TETHER_ATTEMPT'] == '1' else 0)",
            ],
            retries=1,
        )
        wf.task("work", [sys.executable, "-c", _TRACED_TASK, str(go)], depends_on=[flaky])
        run = mesh.client().submit(wf)
        mesh.wait_for(
            lambda: by_name(run.status())["work"].state == S.TASK_STATE_RUNNING, 20, "work running"
        )
        # The controller goes away while `work` runs; a new one takes over from etcd.
        mesh.stop_controller()
        mesh.start_controller(listen=f"127.0.0.1:{port}")
        go.touch()
        mesh.wait_for(
            lambda: mesh.client().get_run(run.id).state == R.RUN_STATE_SUCCEEDED, 30, "run done"
        )
        final = mesh.client().get_run(run.id)
        mesh.wait_for(
            lambda: {"run restarted", "task work", "run work"} <= set(_names(receiver)),
            15,
            "spans exported",
        )
        timeline = json.loads(tether("trace", run.id, "--json", controller=mesh.address).stdout)
    finally:
        mesh.close()

    spans = receiver.spans
    root = _check_one_tree(spans, "run restarted")
    assert root.start_time_unix_nano == final.created_at.ToNanoseconds()
    assert root.end_time_unix_nano == final.finished_at.ToNanoseconds()
    assert {svc for svc, _ in spans} == {"tether-controller", "tether-agent", "task"}
    named = {s.name: s for _, s in spans}
    # The task's own span is a child of the agent's span of its attempt.
    assert named["task work"].parent_span_id == named["run work"].span_id
    # One scheduling decision per attempt; the retry is an event of the run's span.
    assert [s.name for _, s in spans].count("schedule flaky") == 2
    retries = [e for e in root.events if e.name == "retry"]
    assert len(retries) == 1
    attrs = {a.key: a.value for a in retries[0].attributes}
    assert attrs["tether.task"].string_value == "flaky"
    assert attrs["tether.attempt"].int_value == 1
    flaky_task = by_name(final)["flaky"]
    assert retries[0].time_unix_nano == flaky_task.attempts[0].finished_at.ToNanoseconds()

    # `tether trace` agrees with the recorded times, and so with the run's span.
    origin = final.created_at.ToNanoseconds()
    assert timeline["duration"] == pytest.approx(
        (root.end_time_unix_nano - root.start_time_unix_nano) / 1e9, abs=1e-6
    )
    rows = {(a["task"], a["attempt"]): a for a in timeline["attempts"]}
    assert set(rows) == {("flaky", 1), ("flaky", 2), ("work", 1)}
    for tk in final.tasks:
        for att in tk.attempts:
            row = rows[(tk.spec.name, att.number)]
            for name in ("scheduled_at", "started_at", "finished_at"):
                want = (getattr(att, name).ToNanoseconds() - origin) / 1e9
                assert row[name.removesuffix("_at")] == pytest.approx(want, abs=1e-6)
    assert rows[("flaky", 1)]["state"] == "FAILED"
    assert rows[("work", 1)]["ready"] == pytest.approx(rows[("flaky", 2)]["finished"], abs=1e-6)
    assert timeline["critical_path"] == ["flaky", "work"]
    # The agent's span of each attempt holds the attempt's recorded run time.
    work = by_name(final)["work"].attempts[0]
    agent_span = named["run work"]
    assert agent_span.start_time_unix_nano <= work.started_at.ToNanoseconds()
    assert agent_span.end_time_unix_nano >= work.finished_at.ToNanoseconds()


def test_client_calls_carry_the_callers_trace_context(mesh):
    from opentelemetry import trace as otel
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    caller = SpanContext(
        trace_id=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0,
        span_id=0x42,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    wf = Workflow("propagated")
    wf.task("x", [sys.executable, "-c", "pass"])
    with otel.use_span(NonRecordingSpan(caller)):
        run = mesh.client().submit(wf)
    # The run's span, the root of the run's trace, joined the caller's trace as its child.
    status = run.status()
    trace_hex = status.traceparent.split("-")[1]
    assert int(trace_hex, 16) == caller.trace_id
    assert status.parent_traceparent == f"00-{caller.trace_id:032x}-{caller.span_id:016x}-01"


def test_refused_and_repeated_submits_leave_no_orphans(etcd, prefix, tmp_path, receiver):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        client = mesh.client()
        wf = Workflow("again")
        wf.task("x", [sys.executable, "-c", "pass"])
        first = client.submit(wf, request_id="same")
        assert client.submit(wf, request_id="same").existing
        refused = Workflow("refused")
        refused.task("y", [sys.executable, "-c", "pass"], env={"K": Secret("missing")})
        with pytest.raises(TetherError):
            client.submit(refused)
        first.wait(timeout=30)
        mesh.wait_for(
            lambda: (
                _names(receiver).count("submit again") == 2
                and {"run again", "submit refused"} <= set(_names(receiver))
            ),
            15,
            "spans exported",
        )
    finally:
        mesh.close()
    spans = [s for _, s in receiver.spans]
    ids = {s.span_id for s in spans}
    assert all(not s.parent_span_id or s.parent_span_id in ids for s in spans), "no orphans"
    roots = sorted(s.name for s in spans if not s.parent_span_id)
    # The run's trace; the resubmit and the refused submit, each a trace of one span.
    assert roots == ["run again", "submit again", "submit refused"]


def test_an_attempt_lost_with_its_node_is_an_event_of_the_run_span(
    etcd, prefix, tmp_path, receiver
):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        mesh.add_agent("n2")
        client = mesh.client()
        client.cordon_node("n2")  # so that the first attempt runs on n1
        code = "import os,time; time.sleep(30 if os.environ['TETHER_ATTEMPT'] == '1' else 0)"
        wf = Workflow("moved")
        wf.task("long", [sys.executable, "-c", code])
        run = client.submit(wf)
        mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
        client.uncordon_node("n2")
        client.drain_node("n1", deadline=0.2)  # its attempt is stopped and lost, retried on n2
        final = run.wait(timeout=30)
        mesh.wait_for(lambda: "run moved" in _names(receiver), 15, "the run's span")
    finally:
        mesh.close()
    root = _check_one_tree(receiver.spans, "run moved")
    (lost,) = [e for e in root.events if e.name == "node lost"]
    attrs = {a.key: a.value for a in lost.attributes}
    assert attrs["tether.node"].string_value == "n1"
    assert attrs["tether.attempt"].int_value == 1
    assert lost.time_unix_nano == final.tasks[0].attempts[0].finished_at.ToNanoseconds()
    assert not [e for e in root.events if e.name == "retry"], "a lost attempt is no retry"
    nodes = [
        {a.key: a.value.string_value for a in s.attributes}["tether.node"]
        for _, s in receiver.spans
        if s.name == "schedule long"
    ]
    assert nodes == ["n1", "n2"]


def test_without_an_exporter_a_task_still_gets_a_traceparent_in_its_runs_trace(mesh):
    # No OTLP endpoint here: the agent makes no recorded span, only one that carries ids.
    mesh.add_agent("n1")
    wf = Workflow("untraced")
    code = (
        "import os,json;json.dump({'tp': os.environ['TRACEPARENT']},"
        "open(os.environ['TETHER_OUTPUT_FILE'],'w'))"
    )
    wf.task("a", [sys.executable, "-c", code])
    wf.task("b", [sys.executable, "-c", code])
    final = mesh.client().submit(wf).wait(timeout=30)
    assert final.state == t.RunState.RUN_STATE_SUCCEEDED
    run_trace = final.traceparent.split("-")[1]
    got = [json.loads(tk.outputs_json)["tp"].split("-") for tk in final.tasks]
    for version, trace_id, span_id, flags in got:
        assert (version, trace_id, flags) == ("00", run_trace, "01")
        assert len(span_id) == 16 and span_id != "0" * 16
    assert got[0][2] != got[1][2]  # a span of its own per attempt


def test_an_attempt_adopted_after_its_agent_crashed_stays_in_the_runs_trace(
    etcd,
    prefix,
    tmp_path,
    receiver,
):
    """An agent with --leave-running is SIGKILLed while its attempt runs; the next agent on
    the node adopts the attempt. Its ``recover TASK`` span must hang off the run's trace. It
    hangs off the crashed agent's ``run TASK`` span (the traceparent in the attempt's
    labels), which was never ended, so never exported: an orphan, as are the task's own
    spans (their TRACEPARENT names the same lost span)."""
    go = tmp_path / "go"
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", lease_ttl=15)
    first = None
    try:
        mesh.start_controller()
        client = mesh.client()
        first = agent_process(mesh.address, "n1", tmp_path / "agents" / "n1", "--leave-running")
        wait_for(lambda: [n.name for n in client.nodes()] == ["n1"], 20, "n1 registered")
        wf = Workflow("crashed")
        wf.task("work", [sys.executable, "-c", _TRACED_TASK, str(go)])
        run = client.submit(wf)
        wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 20, "running")
        first.send_signal(signal.SIGKILL)
        first.wait()
        mesh.add_agent("n1", leave_running=True)  # same work dir: adopts the attempt
        go.touch()
        final = run.wait(timeout=30)
        assert final.state == t.RunState.RUN_STATE_SUCCEEDED
        assert final.tasks[0].attempt == 1  # adopted, not run again
        mesh.wait_for(
            lambda: {"run crashed", "recover work", "task work"} <= set(_names(receiver)),
            15,
            "spans exported",
        )
    finally:
        if first is not None and first.poll() is None:
            first.kill()
            first.wait()
        mesh.close()
    ids = {s.span_id for _, s in receiver.spans}
    orphans = sorted(
        s.name for _, s in receiver.spans if s.parent_span_id and s.parent_span_id not in ids
    )
    assert orphans == [], f"spans whose parent is not in the run's trace: {orphans}"
    _check_one_tree(receiver.spans, "run crashed")
