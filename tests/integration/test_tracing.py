"""One run is one trace: controller and agent spans reach a real OTLP/gRPC receiver as one tree."""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures

import grpc
from helpers import Mesh
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow


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


def test_one_run_is_one_trace_across_controller_and_agent(etcd, prefix, tmp_path, monkeypatch):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
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
            "submit traced",
            "dispatch a",
            "dispatch b",
            "run a",
            "run b",
            "record a",
            "record b",
        }
        mesh.wait_for(
            lambda: names_wanted <= {s.name for _, s in receiver.spans}, 15, "spans exported"
        )
    finally:
        mesh.close()
        server.stop(0)

    spans = receiver.spans
    by_id = {s.span_id: (svc, s) for svc, s in spans}
    trace_ids = {s.trace_id for _, s in spans}
    assert len(trace_ids) == 1, "every span of the run shares one trace id"
    roots = [s for _, s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == ["submit traced"]
    for _, s in spans:
        if s.parent_span_id:
            assert s.parent_span_id in by_id, f"{s.name} has a parent that is not in the trace"
    services = {svc for svc, _ in spans}
    assert services == {"tether-controller", "tether-agent"}
    named = {s.name: (svc, s) for svc, s in spans}
    for task in ("a", "b"):
        svc, run_span = named[f"run {task}"]
        assert svc == "tether-agent"
        dispatch = named[f"dispatch {task}"][1]
        assert run_span.parent_span_id == dispatch.span_id
        assert dispatch.parent_span_id == roots[0].span_id
        # The task process got TRACEPARENT pointing at the agent's run span.
        _version, trace_hex, span_hex, _ = traceparents[task].split("-")
        assert bytes.fromhex(trace_hex) == run_span.trace_id
        assert bytes.fromhex(span_hex) == run_span.span_id


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
    # The controller's submit span, the root of the run's trace, joined the caller's trace.
    trace_hex = run.status().traceparent.split("-")[1]
    assert int(trace_hex, 16) == caller.trace_id
