"""Property-based tests: no spec, however odd, crashes validation or gets INTERNAL from a server."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.api.v1 import controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc
from tether.sdk import InvalidSpecError
from tether.sdk.validation import validate_params, validate_workflow

NAMES = st.sampled_from(["a", "b", "c", "d", "train", "x.y", "", "bad name", "-x", "é", "a" * 70])
TEXT = st.text(max_size=20) | st.sampled_from(
    [
        "{{ params.p }}",
        "{{ tasks.a.outputs.k }}",
        "{{ tasks.zz.outputs }}",
        "{{ nope }}",
        "{{",
        "}}",
        "{{ params. }}",
        "{'a': {'b': 1}}",
    ]
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.floats(-2, 8)
INTS = st.integers(-(2**40), 2**40) | st.integers(-3, 200)


@st.composite
def durations(draw):
    return duration_pb2.Duration(
        seconds=draw(st.integers(-(10**8), 10**8)),
        nanos=draw(st.integers(-999_999_999, 999_999_999)),
    )


@st.composite
def task_specs(draw):
    spec = t.TaskSpec(
        name=draw(NAMES),
        command=draw(st.lists(TEXT, max_size=3)),
        env=draw(st.dictionaries(st.sampled_from(["A", "B_1", "1X", "", "a-b"]), TEXT, max_size=2)),
        resources=t.Resources(
            cpu=draw(FLOATS), memory_bytes=draw(INTS), gpu=draw(st.integers(-5, 2000))
        ),
        depends_on=draw(st.lists(NAMES, max_size=3)),
        retries=draw(st.integers(-5, 200)),
        image_pull_policy=draw(st.sampled_from(["", "always", "never", "sometimes"])),
        allow_failure=draw(st.booleans()),
    )
    if draw(st.booleans()):
        spec.timeout.CopyFrom(draw(durations()))
    if draw(st.booleans()):
        spec.backoff.CopyFrom(
            t.RetryBackoff(
                initial=draw(durations()),
                factor=draw(FLOATS),
                max=draw(durations()),
                jitter=draw(FLOATS),
            )
        )
    return spec


@st.composite
def workflow_specs(draw):
    spec = t.WorkflowSpec(
        name=draw(st.text(max_size=10) | st.just("wf")),
        tasks=draw(st.lists(task_specs(), max_size=6)),
    )
    if draw(st.booleans()):
        spec.timeout.CopyFrom(draw(durations()))
    return spec


@settings(max_examples=400, deadline=None)
@given(workflow_specs(), st.dictionaries(st.sampled_from(["p", "q"]), st.text(max_size=5)))
def test_validation_accepts_or_names_the_problem(spec, params):
    try:
        validate_workflow(spec)
        validate_params(spec, params)
    except InvalidSpecError as e:
        assert e.violations and all(str(v) for v in e.violations)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    spec=workflow_specs(),
    params=st.dictionaries(st.sampled_from(["p", "q"]), st.text(max_size=5)),
    request_id=st.text(max_size=5) | st.text(min_size=129, max_size=130),
)
def test_server_answers_ok_or_invalid_argument_never_internal(mesh, spec, params, request_id):
    with grpc.insecure_channel(mesh.address) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        try:
            resp = stub.SubmitWorkflow(
                controller_pb2.SubmitWorkflowRequest(
                    spec=spec, params=params, request_id=request_id
                ),
                timeout=10,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                # A request id drawn before, with another spec: refused, not the old run.
                assert request_id and "belongs to run" in e.details(), e.details()
                return
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert e.details()
            return
        got = stub.GetRun(controller_pb2.GetRunRequest(run_id=resp.run_id), timeout=10).run
        assert len(got.tasks) == len(spec.tasks)
        if resp.existing:
            return  # the same request id came up before: that run was already cancelled
        try:
            stub.CancelRun(controller_pb2.CancelRunRequest(run_id=resp.run_id), timeout=10)
        except grpc.RpcError as e:
            # A run that ended first (a timeout of a nanosecond, say) is not cancelled: that
            # is the answer for a finished run, not a server error.
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
            run = stub.GetRun(controller_pb2.GetRunRequest(run_id=resp.run_id), timeout=10).run
            assert run.state in lc.RUN_TERMINAL, run.state
            assert f"already {lc.run_state_name(run.state)}" in e.details(), e.details()
