"""Hostile input over raw gRPC against a real controller process (issue 8, item 8).

Every request below is refused with INVALID_ARGUMENT (RESOURCE_EXHAUSTED where a size limit of
gRPC itself says so) and a short message naming the field and the limit, never INTERNAL or
UNKNOWN; a valid but huge spec is accepted. Throughout, a background probe of the gRPC health
service must answer within 1 s every time (a blocked event loop would miss it), and the
controller's log has no traceback.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ControllerProcess

from tether.api.v1 import agent_pb2, controller_pb2
from tether.api.v1 import types_pb2 as t

_SERVICE = "/tether.v1.ControllerService/"
_METADATA_LIMIT = 16 * 1024


def _task(name: str, **kw) -> t.TaskSpec:
    return t.TaskSpec(name=name, command=kw.pop("command", ["true"]), **kw)


def _submit(*tasks: t.TaskSpec, params=None, **spec_kw) -> controller_pb2.SubmitWorkflowRequest:
    return controller_pb2.SubmitWorkflowRequest(
        spec=t.WorkflowSpec(name="hostile", tasks=list(tasks), **spec_kw), params=params or {}
    )


def _chain(n: int, refs: int) -> controller_pb2.SubmitWorkflowRequest:
    """A valid chain whose every task refers to the outputs of ``refs`` tasks at its top: the
    walk up the dependencies that checked each reference made validation quadratic."""
    tasks = [_task("t0")]
    for i in range(1, n):
        args = [f"{{{{ tasks.t{j}.outputs.value }}}}" for j in range(min(i, refs))]
        tasks.append(_task(f"t{i}", command=["echo", *args], depends_on=[f"t{i - 1}"]))
    return _submit(*tasks)


def _hostile_cases():
    """(name, method, request bytes, expected code, words the message must contain)."""
    inv, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = _task("a")
    big_params = {f"p{i}": "x" * 4096 for i in range(1000)}
    timeout = t.WorkflowSpec().timeout.__class__(seconds=1, nanos=1_500_000_000)
    task_timeout = _task("a")
    task_timeout.timeout.nanos = 2_000_000_000
    valid = _submit(ok).SerializeToString()
    return [
        (
            "1000 params of 4 KiB",
            "SubmitWorkflow",
            _submit(ok, params=big_params),
            inv,
            ["params", "max_params_bytes"],
        ),
        (
            "10 MB run id",
            "GetRun",
            controller_pb2.GetRunRequest(run_id="r" * 10_000_000),
            inv,
            ["run_id", "max_id_length"],
        ),
        (
            "10 MB run id to watch",
            "WatchRun",
            controller_pb2.WatchRunRequest(run_id="r" * 10_000_000),
            inv,
            ["run_id"],
        ),
        (
            "1 MB task in CancelRun",
            "CancelRun",
            controller_pb2.CancelRunRequest(run_id="r", task="x" * 1_000_000),
            inv,
            ["task"],
        ),
        (
            "1 MB cancel reason",
            "CancelRun",
            controller_pb2.CancelRunRequest(run_id="r", reason="x" * 1_000_000),
            inv,
            ["reason"],
        ),
        (
            "1 MB log task",
            "StreamLogs",
            controller_pb2.StreamLogsRequest(run_id="r", task="x" * 1_000_000),
            inv,
            ["task"],
        ),
        (
            "1 MB page token",
            "ListRuns",
            controller_pb2.ListRunsRequest(page_token="x" * 1_000_000),
            inv,
            ["page_token"],
        ),
        ("invalid UTF-8 run id", "GetRun", b"\x0a\x02\xff\xfe", inv, ["malformed"]),
        ("truncated submit", "SubmitWorkflow", valid[: len(valid) // 2], inv, ["malformed"]),
        ("garbage submit", "SubmitWorkflow", b"\xff" * 64, inv, ["malformed"]),
        ("garbage stream request", "WatchRun", b"\x0a\xff\xff\xff", inv, ["malformed"]),
        ("1 MB task name", "SubmitWorkflow", _submit(_task("n" * 1_000_000)), inv, ["name"]),
        (
            "20,000 violations",
            "SubmitWorkflow",
            _submit(*[_task(f"t{i}", command=[]) for i in range(20_000)]),
            inv,
            ["command", "more problems"],
        ),
        (
            "20 KB bad template",
            "SubmitWorkflow",
            _submit(_task("a", command=["echo", "{{ " + "x" * 20_000 + " }}"])),
            inv,
            ["command[1]", "bad template"],
        ),
        (
            "run timeout nanos >= 1e9",
            "SubmitWorkflow",
            _submit(ok, timeout=timeout),
            inv,
            ["timeout", "nanos"],
        ),
        (
            "task timeout nanos >= 1e9",
            "SubmitWorkflow",
            _submit(task_timeout),
            inv,
            ["tasks[0] (a).timeout", "nanos"],
        ),
        (
            "200 KB env value",
            "SubmitWorkflow",
            _submit(_task("a", env={"BIG": "v" * 200_000})),
            inv,
            ["env.BIG", "max_env_value_bytes"],
        ),
        (
            "env over its total",
            "SubmitWorkflow",
            _submit(_task("a", env={f"E{i}": "v" * 30_000 for i in range(6)})),
            inv,
            ["env", "max_env_bytes"],
        ),
        (
            "200 KB argument",
            "SubmitWorkflow",
            _submit(_task("a", command=["echo", "a" * 200_000])),
            inv,
            ["command[1]", "max_arg_bytes"],
        ),
        (
            "too many tasks",
            "SubmitWorkflow",
            _submit(*[_task(f"t{i}") for i in range(200_001)]),
            inv,
            ["tasks", "max_tasks"],
        ),
        (
            "priority out of range",
            "SubmitWorkflow",
            _submit(_task("a", priority=-5)),
            inv,
            ["tasks[0] (a).priority", "0..100"],
        ),
        (
            "unknown scheduling policy",
            "SubmitWorkflow",
            _submit(ok, scheduling=t.SchedulingSpec(policy="x" * 10_000)),
            inv,
            ["scheduling.policy", "known"],
        ),
        (
            "bad affinity operator",
            "SubmitWorkflow",
            _submit(_task("a", affinity=[t.AffinityTerm(key="k", operator="Near")])),
            inv,
            ["tasks[0] (a).affinity[0].operator"],
        ),
        (
            "a million replicas",
            "SubmitWorkflow",
            _submit(_task("a", replicas=1_000_000)),
            inv,
            ["tasks[0] (a).replicas"],
        ),
        (
            "message over --max-message-bytes",
            "GetRun",
            controller_pb2.GetRunRequest(run_id="r" * 17 * 2**20),
            exhausted,
            [],
        ),
    ]


class _HealthProbe:
    """Checks the controller's health service every 50 ms from a thread; records the worst."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.slowest = 0.0
        self.probes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.probes += 1
            self.stop.wait(0.05)

    def __enter__(self) -> _HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.channel.close()


@pytest.fixture
def controller(etcd, prefix, tmp_path):
    proc = ControllerProcess(etcd.endpoint, prefix, tmp_path / "controller.log")
    proc.args += ["--max-message-bytes", "16Mi"]
    proc.start()
    yield proc, tmp_path / "controller.log"
    proc.stop()


def _call(channel: grpc.Channel, method: str, request, stream: bool):
    data = request if isinstance(request, bytes) else request.SerializeToString()
    if stream:
        call = channel.unary_stream(_SERVICE + method)
        return list(call(data, timeout=60))
    return channel.unary_unary(_SERVICE + method)(data, timeout=60)


def test_hostile_input_is_refused_and_the_loop_keeps_answering(controller):
    proc, log = controller
    cases = _hostile_cases()
    channel = grpc.insecure_channel(
        proc.address,
        options=[
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.max_receive_message_length", 64 * 2**20),
        ],
    )
    with channel, _HealthProbe(proc.address) as probe:
        for name, method, request, code, words in cases:
            stream = method in ("WatchRun", "StreamLogs")
            with pytest.raises(grpc.RpcError) as info:
                _call(channel, method, request, stream)
            err = info.value
            assert err.code() == code, f"{name}: {err.code()} {err.details()[:300]}"
            details = err.details() or ""
            assert len(details.encode()) < _METADATA_LIMIT // 2, name
            for word in words:
                assert word in details, f"{name}: {word!r} not in {details[:500]!r}"

        # Garbage on the agents' stream is refused the same way.
        connect = channel.stream_stream("/tether.v1.AgentService/Connect")
        with pytest.raises(grpc.RpcError) as info:
            list(connect(iter([b"\xff" * 32]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        first_register = agent_pb2.AgentMessage(register=agent_pb2.Register(node="x" * 100_000))
        with pytest.raises(grpc.RpcError) as info:
            list(connect(iter([first_register.SerializeToString()]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(info.value.details()) < 1000

        # A valid 3,000-task chain with ten far references per task: accepted, while the
        # probe keeps answering (validation is linear and runs off the event loop).
        chain = _chain(3000, 10)
        assert chain.ByteSize() > 800_000
        started = time.monotonic()
        reply = controller_pb2.SubmitWorkflowResponse.FromString(
            _call(channel, "SubmitWorkflow", chain, stream=False)
        )
        took = time.monotonic() - started
        assert reply.run_id
        cancel = controller_pb2.CancelRunRequest(run_id=reply.run_id, reason="test")
        _call(channel, "CancelRun", cancel, stream=False)
    assert probe.probes > 10
    assert not probe.failures, probe.failures[:5]
    assert probe.slowest < 1.0, f"a health probe took {probe.slowest:.2f}s"
    print(f"3,000-task chain submitted in {took:.2f}s; slowest probe {probe.slowest:.3f}s")
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "internal error" not in text
