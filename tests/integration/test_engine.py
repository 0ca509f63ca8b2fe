"""The workflow engine on a real mesh: retries, timeouts, cancellation, failure policy,
templating, watch/resume, idempotent submit, fencing and lost nodes."""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import pytest
from helpers import R, S, by_name, py, secs

from tether.api.v1 import agent_pb2, agent_pb2_grpc, controller_pb2, controller_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk import InvalidSpecError, Workflow
from tether.sdk.errors import AlreadyExistsError

FAIL_TIMES = (
    "import os,sys;p=os.path.join({d!r},'count');n=int(open(p).read()) if os.path.exists(p) "
    "else 0;open(p,'w').write(str(n+1));sys.exit(7 if n < {k} else 0)"
)


def test_retries_with_backoff_keep_each_failed_attempt(mesh, tmp_path):
    mesh.add_agent("n1")
    wf = Workflow("retry")
    wf.task(
        "flaky",
        py(FAIL_TIMES.format(d=str(tmp_path), k=2)),
        retries=2,
        backoff={"initial": "200ms", "factor": 2, "max": "10s", "jitter": 0},
    )
    final = mesh.client().submit(wf).wait(timeout=30)
    tk = by_name(final)["flaky"]
    assert final.state == R.RUN_STATE_SUCCEEDED
    assert tk.attempt == 3
    assert [(a.number, a.state, a.exit_code, a.reason) for a in tk.attempts] == [
        (1, S.TASK_STATE_FAILED, 7, "exit_code"),
        (2, S.TASK_STATE_FAILED, 7, "exit_code"),
        (3, S.TASK_STATE_SUCCEEDED, 0, ""),
    ]
    gap1 = secs(tk.attempts[1].scheduled_at) - secs(tk.attempts[0].finished_at)
    gap2 = secs(tk.attempts[2].scheduled_at) - secs(tk.attempts[1].finished_at)
    assert gap1 >= 0.19 and gap2 >= 0.39, (gap1, gap2)  # 200 ms, then 400 ms


def test_retries_exhausted_fail_the_task(mesh, tmp_path):
    mesh.add_agent("n1")
    wf = Workflow("exhaust")
    wf.task(
        "bad",
        py(FAIL_TIMES.format(d=str(tmp_path), k=99)),
        retries=1,
        backoff={"initial": "50ms", "jitter": 0},
    )
    final = mesh.client().submit(wf).wait(timeout=30)
    tk = by_name(final)["bad"]
    assert final.state == R.RUN_STATE_FAILED and tk.state == S.TASK_STATE_FAILED
    assert len(tk.attempts) == 2 and tk.exit_code == 7
    assert "bad" in final.message


def test_task_timeout_kills_the_attempt(mesh):
    mesh.add_agent("n1")
    wf = Workflow("slow")
    wf.task("sleepy", py("import time; time.sleep(60)"), timeout="500ms")
    t0 = time.monotonic()
    final = mesh.client().submit(wf).wait(timeout=30)
    tk = by_name(final)["sleepy"]
    assert tk.state == S.TASK_STATE_FAILED and tk.reason == "timeout"
    assert time.monotonic() - t0 < 10
    assert secs(tk.finished_at) - secs(tk.started_at) < 5


def test_run_timeout_stops_everything_and_fails_the_run(mesh):
    mesh.add_agent("n1")
    wf = Workflow("run-timeout", timeout="1s")
    a = wf.task("long", py("import time; time.sleep(60)"))
    wf.task("after", py("pass"), depends_on=[a])
    final = mesh.client().submit(wf).wait(timeout=30)
    assert final.state == R.RUN_STATE_FAILED and final.timed_out
    assert "timed out" in final.message
    tasks = by_name(final)
    assert tasks["long"].state == S.TASK_STATE_CANCELLED
    assert tasks["after"].state in (S.TASK_STATE_CANCELLED, S.TASK_STATE_SKIPPED)


TERM_AWARE = (
    "import signal,sys,time,os\n"
    "def term(*_):\n"
    "    open(os.path.join({d!r},'term'),'w').write('got SIGTERM'); sys.exit(143)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "open(os.path.join({d!r},'started'),'w').write('1')\n"
    "time.sleep(60)\n"
)


def test_cancel_run_stops_the_process_and_skips_dependents(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("cancel-me")
    a = wf.task("worker", py(TERM_AWARE.format(d=str(tmp_path))))
    wf.task("downstream", py("pass"), depends_on=[a])
    run = client.submit(wf)
    mesh.wait_for(lambda: (tmp_path / "started").exists(), 15, "task started")
    t0 = time.monotonic()
    client.cancel(run.id)
    final = run.wait(timeout=20)
    assert time.monotonic() - t0 < 2.0 + 3  # within the grace period (2 s in tests)
    assert (tmp_path / "term").read_text() == "got SIGTERM"
    tasks = by_name(final)
    assert final.state == R.RUN_STATE_CANCELLED
    assert tasks["worker"].state == S.TASK_STATE_CANCELLED
    assert tasks["downstream"].state in (S.TASK_STATE_SKIPPED, S.TASK_STATE_CANCELLED)


def test_cancel_kills_a_process_that_ignores_sigterm_after_the_grace(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    code = (
        "import signal,time,os;signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"open(os.path.join({str(tmp_path)!r},'started'),'w').write('1');time.sleep(60)"
    )
    wf = Workflow("stubborn")
    wf.task("stubborn", py(code))
    run = client.submit(wf)
    mesh.wait_for(lambda: (tmp_path / "started").exists(), 15, "task started")
    t0 = time.monotonic()
    client.cancel(run.id)
    final = run.wait(timeout=20)
    elapsed = time.monotonic() - t0
    assert final.state == R.RUN_STATE_CANCELLED
    assert 1.5 < elapsed < 8, elapsed  # SIGKILL came after the 2 s grace, not before


def test_cancel_one_task_skips_its_dependents_only(mesh, tmp_path):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("partial")
    a = wf.task("a", py(TERM_AWARE.format(d=str(tmp_path))))
    wf.task("a-child", py("pass"), depends_on=[a])
    wf.task("independent", py("import time; time.sleep(0.5)"))
    run = client.submit(wf)
    mesh.wait_for(lambda: (tmp_path / "started").exists(), 15, "task started")
    client.cancel(run.id, task="a")
    final = run.wait(timeout=20)
    tasks = by_name(final)
    assert tasks["a"].state == S.TASK_STATE_CANCELLED
    assert tasks["a-child"].state == S.TASK_STATE_SKIPPED
    assert tasks["independent"].state == S.TASK_STATE_SUCCEEDED
    assert final.state == R.RUN_STATE_FAILED


def test_allow_failure_lets_dependents_run(mesh):
    mesh.add_agent("n1")
    wf = Workflow("tolerant")
    a = wf.task("optional", py("raise SystemExit(1)"), allow_failure=True)
    wf.task("next", py("pass"), depends_on=[a])
    final = mesh.client().submit(wf).wait(timeout=30)
    tasks = by_name(final)
    assert tasks["optional"].state == S.TASK_STATE_FAILED
    assert tasks["next"].state == S.TASK_STATE_SUCCEEDED
    assert final.state == R.RUN_STATE_SUCCEEDED


def test_templating_from_params_and_upstream_outputs(mesh):
    mesh.add_agent("n1")
    wf = Workflow("templated")
    train = wf.task(
        "train",
        py(
            "import json,os;json.dump({'model_uri': 's3://models/m1', 'metrics': {'auc': 0.93}},"
            "open(os.environ['TETHER_OUTPUT_FILE'],'w'))"
        ),
    )
    wf.task(
        "deploy",
        [
            *py(
                "import json,os,sys;json.dump({'argv': sys.argv[1:], 'env': os.environ['TARGET']},"
                "open(os.environ['TETHER_OUTPUT_FILE'],'w'))"
            ),
            "{{ tasks.train.outputs.model_uri }}",
            "auc={{tasks.train.outputs.metrics.auc}}",
            "{{ params.stage }}",
        ],
        depends_on=[train],
        env={"TARGET": "{{ params.region }}-x"},
    )
    run = mesh.client().submit(wf, params={"stage": "prod", "region": "eu"})
    final = run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED
    out = json.loads(by_name(final)["deploy"].outputs_json)
    assert out == {"argv": ["s3://models/m1", "auc=0.93", "prod"], "env": "eu-x"}
    # The stored spec keeps the template; the rendered values went to the agent.
    assert by_name(final)["deploy"].spec.command[-1] == "{{ params.stage }}"


def test_templating_errors_are_invalid_argument(mesh):
    client = mesh.client()
    wf = Workflow("bad-template")
    wf.task("a", py("pass"))
    wf.task("b", ["echo", "{{ tasks.a.outputs.x }}"])  # a is not upstream of b
    with pytest.raises(InvalidSpecError) as e:
        client.submit(wf)
    assert "tasks[1] (b).command[1]: task 'a' is not upstream of 'b'" in str(e.value)
    wf2 = Workflow("missing-param")
    wf2.task("a", ["echo", "{{ params.nope }}"])
    with pytest.raises(InvalidSpecError) as e:
        client.submit(wf2)
    assert "tasks[0] (a).command[1]: parameter 'nope' was not given" in str(e.value)
    wf3 = Workflow("garbage")
    wf3.task("a", ["echo", "{{ steps.x.output }}"])
    with pytest.raises(InvalidSpecError) as e:
        client.submit(wf3)
    assert "tasks[0] (a).command[1]: bad template" in str(e.value)
    # The server checks too (straight to the API, no SDK validation).
    spec = t.WorkflowSpec(
        name="p", tasks=[t.TaskSpec(name="a", command=["echo", "{{ params.q }}"])]
    )
    with grpc.insecure_channel(mesh.address) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitWorkflow(controller_pb2.SubmitWorkflowRequest(spec=spec), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'q' was not given" in err.value.details()


def test_missing_output_key_fails_the_task_with_reason_template(mesh):
    mesh.add_agent("n1")
    wf = Workflow("missing-key")
    a = wf.task("a", py("pass"))  # writes no output
    wf.task("b", ["echo", "{{ tasks.a.outputs.x }}"], depends_on=[a])
    final = mesh.client().submit(wf).wait(timeout=30)
    b = by_name(final)["b"]
    assert b.state == S.TASK_STATE_FAILED and b.reason == "template"
    assert "has no output" in b.message


def _transitions(events) -> list[tuple[str, int, int]]:
    out = []
    for ev in events:
        if ev.HasField("task"):
            out.append((ev.task.spec.name, ev.task.state, ev.revision))
    return out


def test_watch_resumes_from_a_revision_without_gaps_or_repeats(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("watched")
    prev = None
    for i in range(4):
        prev = wf.task(
            f"s{i}", py("import time; time.sleep(0.2)"), depends_on=[prev] if prev else []
        )
    run = client.submit(wf)
    full: list = []
    done = threading.Event()

    def watch_all():
        full.extend(client.watch(run.id))
        done.set()

    threading.Thread(target=watch_all, daemon=True).start()
    # A second client that disconnects after a few events and resumes.
    first_part = []
    for ev in client.watch(run.id):
        first_part.append(ev)
        if len(_transitions(first_part)) >= 3:
            break  # disconnect
    last = first_part[-1].revision
    # Changes happen while it is away: at least one more task finishes.
    seen_done = {n for n, st, _ in _transitions(first_part) if st == S.TASK_STATE_SUCCEEDED}
    mesh.wait_for(
        lambda: (
            sum(tk.state == S.TASK_STATE_SUCCEEDED for tk in run.status().tasks) > len(seen_done)
        ),
        30,
        "a change while the watcher is away",
    )
    second_part = list(client.watch(run.id, from_revision=last))
    assert done.wait(30)
    assert not second_part[0].HasField("snapshot")
    resumed = _transitions(first_part) + _transitions(second_part)
    assert len(resumed) == len(set(resumed)), "a transition was seen twice"
    # Both watchers see the same changes after the later of their two snapshots.
    since = max(first_part[0].revision, full[0].revision)
    assert [x for x in resumed if x[2] > since] == [x for x in _transitions(full) if x[2] > since]
    assert any(x[2] > last for x in resumed), "changes happened while disconnected"
    final_states = {name: state for name, state, _ in resumed}
    assert final_states == {f"s{i}": S.TASK_STATE_SUCCEEDED for i in range(4)}
    assert second_part[-1].run_state == R.RUN_STATE_SUCCEEDED


def test_idempotent_submit_returns_the_first_run(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("once")
    wf.task("x", py("pass"))
    first = client.submit(wf, request_id="req-42")
    second = client.submit(wf, request_id="req-42")
    assert second.id == first.id and second.existing and not first.existing
    assert sum(1 for r in client.list_runs() if r.workflow_name == "once") == 1
    big = Workflow("once-big")  # above one etcd transaction: the chunked path
    for i in range(300):
        big.task(f"t{i}", py("pass"))
    a, b = client.submit(big, request_id="req-big"), client.submit(big, request_id="req-big")
    assert a.id == b.id and b.existing


def test_reused_request_id_with_another_workflow_or_params_is_refused(mesh):
    client = mesh.client()
    wf = Workflow("first")
    wf.task("x", py("pass"))
    run = client.submit(wf, params={"p": "1"}, request_id="req-7")
    other = Workflow("second")
    other.task("y", py("pass"))
    for spec, params in ((other, {"p": "1"}), (wf, {"p": "2"}), (wf, {})):
        with pytest.raises(AlreadyExistsError) as e:
            client.submit(spec, params=params, request_id="req-7")
        assert "req-7" in str(e.value) and run.id in str(e.value)
    assert client.submit(wf, params={"p": "1"}, request_id="req-7").id == run.id
    big = Workflow("big")  # the chunked path checks the same way
    for i in range(300):
        big.task(f"t{i}", py("pass"))
    client.submit(big, request_id="req-big-2")
    with pytest.raises(AlreadyExistsError, match="belongs to run"):
        client.submit(big, params={"p": "x"}, request_id="req-big-2")
    names = [r.workflow_name for r in client.list_runs()]
    assert names.count("first") == 1 and "second" not in names and names.count("big") == 1


class FakeAgent:
    """Speaks the agent protocol directly, to send what a real agent never would."""

    def __init__(self, address: str, node: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.out: queue.Queue = queue.Queue()
        self.out.put(
            agent_pb2.AgentMessage(
                register=agent_pb2.Register(
                    node=node, capacity=t.Resources(cpu=4, memory_bytes=2**33), max_tasks=4
                )
            )
        )
        stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.responses = stub.Connect(iter(self.out.get, None))
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for msg in self.responses:
                self.inbox.put(msg)
        except grpc.RpcError:
            pass

    def next(self, kind: str, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.WhichOneof("msg") == kind:
                return getattr(msg, kind)
        raise AssertionError(f"no {kind} message")

    def send_status(self, ref, state, **kw):
        self.out.put(
            agent_pb2.AgentMessage(status=agent_pb2.TaskStatus(ref=ref, state=state, **kw))
        )

    def close(self):
        self.out.put(None)
        self.channel.close()


def test_fencing_rejects_stale_attempts_and_kills_them(mesh):
    fake = FakeAgent(mesh.address, "fenced")
    try:
        fake.next("registered")
        client = mesh.client()
        wf = Workflow("fence")
        wf.task("x", py("pass"))
        run = client.submit(wf)
        assign = fake.next("assign")
        ref = assign.ref
        assert ref.attempt == 1
        stale = agent_pb2.AttemptRef(run_id=ref.run_id, task=ref.task, attempt=7)
        # A RUNNING report for an attempt that is not current: the agent is told to kill it.
        fake.send_status(stale, S.TASK_STATE_RUNNING)
        cancel = fake.next("cancel")
        assert cancel.ref.attempt == 7 and cancel.reason == "stale attempt"
        # A final report for it is acknowledged but changes nothing.
        fake.send_status(stale, S.TASK_STATE_SUCCEEDED, outputs_json='{"bogus": true}')
        assert fake.next("ack").ref.attempt == 7
        tk = run.status().tasks[0]
        assert tk.state == S.TASK_STATE_SCHEDULED and not tk.outputs_json
        # The current attempt's report is recorded exactly once, and acknowledged.
        fake.send_status(ref, S.TASK_STATE_SUCCEEDED, outputs_json='{"real": 1}')
        assert fake.next("ack").ref.attempt == 1
        fake.send_status(ref, S.TASK_STATE_SUCCEEDED, outputs_json='{"again": 2}')
        assert fake.next("ack").ref.attempt == 1
        final = run.wait(timeout=10)
        assert final.state == R.RUN_STATE_SUCCEEDED
        assert json.loads(final.tasks[0].outputs_json) == {"real": 1}
        assert [a.state for a in final.tasks[0].attempts] == [S.TASK_STATE_SUCCEEDED]
    finally:
        fake.close()


def test_lost_node_reschedules_without_using_up_retries(mesh):
    client = mesh.client()
    fake = FakeAgent(mesh.address, "doomed")
    fake.next("registered")
    wf = Workflow("survivor")
    wf.task(
        "x",
        py(
            "import json,os;json.dump({'node': os.environ['TETHER_TASK']},"
            "open(os.environ['TETHER_OUTPUT_FILE'],'w'))"
        ),
        retries=0,
    )
    run = client.submit(wf)
    assign = fake.next("assign")
    fake.send_status(assign.ref, S.TASK_STATE_RUNNING)
    mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "running")
    fake.close()  # the node dies: no more heartbeats, its lease (2 s) expires
    mesh.add_agent("healthy")
    final = run.wait(timeout=30)
    tk = final.tasks[0]
    assert final.state == R.RUN_STATE_SUCCEEDED
    assert [(a.node, a.state, a.reason) for a in tk.attempts] == [
        ("doomed", S.TASK_STATE_LOST, "node_lost"),
        ("healthy", S.TASK_STATE_SUCCEEDED, ""),
    ]
    assert tk.lost_attempts == 1


def test_watch_resumed_after_the_end_returns_at_once(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("ended")
    wf.task("x", py("pass"))
    run = client.submit(wf)
    last = 0
    for ev in client.watch(run.id):
        last = max(last, ev.revision)
    events = list(client.watch(run.id, from_revision=last + 5, timeout=10))
    assert [e.run_state for e in events] == [R.RUN_STATE_SUCCEEDED]


def test_wait_honours_its_timeout_while_nothing_happens(mesh):
    from tether.sdk.errors import TimeoutError as TetherTimeout

    wf = Workflow("stuck")  # no agent: it never starts
    wf.task("x", py("pass"))
    run = mesh.client().submit(wf)
    t0 = time.monotonic()
    with pytest.raises(TetherTimeout):
        run.wait(timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_watch_run_only_sends_the_runs_own_changes(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("run-only")
    a = wf.task("a", py("import time; time.sleep(0.2)"))
    wf.task("b", py("pass"), depends_on=[a])
    run = client.submit(wf)
    events = list(client.watch(run.id, run_only=True, timeout=30))
    assert events[0].HasField("snapshot") and not events[0].snapshot.tasks
    assert not any(ev.HasField("task") for ev in events)
    assert events[-1].run_state == R.RUN_STATE_SUCCEEDED
    # Watched in full, the same run's snapshot has its tasks; resuming run-only after its end
    # is answered at once with the final state.
    (full,) = list(client.watch(run.id, timeout=30))
    assert [tk.spec.name for tk in full.snapshot.tasks] == ["a", "b"]
    resumed = list(client.watch(run.id, events[-1].revision, timeout=10, run_only=True))
    assert [e.run_state for e in resumed] == [R.RUN_STATE_SUCCEEDED]
