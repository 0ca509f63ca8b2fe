"""Secrets: set, listed by name, given to a task, and found nowhere else a run leaves traces.

The main test runs a task that prints its secret on a real mesh that traces to a real OTLP
receiver and logs (at debug) into a buffer, then greps every etcd value under the prefix,
every log line, every span, ``tether status --json``, every read API's reply and every file
in the agents' work dirs: the value is only in the task's own stdout log.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import uuid
from concurrent import futures

import grpc
import pytest
import structlog
from etcd3aio import Etcd3Client, prefix_range_end
from helpers import Mesh, assert_one_line_error, by_name, py, tether
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from test_tracing import Receiver

from tether.api.v1 import types_pb2 as t
from tether.sdk import (
    FailedPreconditionError,
    InvalidSpecError,
    NotFoundError,
    Secret,
    Workflow,
)

SUCCEEDED = t.RunState.RUN_STATE_SUCCEEDED


def _key_file(path):
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return str(path)


def _etcd_dump(endpoint: str, prefix: str) -> list[tuple[bytes, bytes]]:
    async def dump():
        async with Etcd3Client([endpoint]) as c:
            resp = await c.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
            return [(kv.key, kv.value) for kv in resp.kvs]

    return asyncio.run(dump())


@pytest.fixture
def logs():
    """Every structlog line (and stdlib log record) of this process, as JSON text."""
    from tether.sdk.telemetry import setup_logging

    saved = structlog.get_config()
    buf = io.StringIO()
    setup_logging("debug", json=True, stream=buf)
    yield buf
    structlog.configure(**saved)


@pytest.fixture
def receiver(monkeypatch):
    """A real OTLP/gRPC trace receiver that every tracer made from now on exports to."""
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield rec
    server.stop(0)


@pytest.fixture
def key_file(tmp_path):
    return _key_file(tmp_path / "secrets.key")


@pytest.fixture
def smesh(etcd, prefix, tmp_path, key_file):
    """A mesh whose controller has a secrets key, with one agent."""
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", secrets_key_file=key_file)
    m.start_controller()
    m.add_agent("n1")
    yield m
    m.close()


def test_secret_reaches_the_task_and_nothing_else(etcd, prefix, tmp_path, key_file, logs, receiver):
    value = f"s3cr3t-{uuid.uuid4().hex}"
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", secrets_key_file=key_file)
    try:
        mesh.start_controller()
        mesh.add_agent("n1")
        client = mesh.client()
        assert client.set_secret("api-key", value) is False
        wf = Workflow("uses-secret")
        first = wf.task(
            "call",
            py("import os; print('key is', os.environ['API_KEY'])"),
            env={"API_KEY": Secret("api-key"), "MODE": "plain"},
        )
        wf.task("after", py("print('done')"), depends_on=[first])
        run = client.submit(wf)
        final = run.wait(timeout=30)
        assert final.state == SUCCEEDED, final
        stdout = b"".join(c.data for c in client.logs(run.id, "call") if c.stream == "stdout")
        assert stdout == f"key is {value}\n".encode()
        # The report's tail (stored, shown by `tether status`) has it masked.
        assert by_name(final)["call"].stdout_tail == "key is [secret]\n"
        assert dict(by_name(final)["call"].spec.env_secrets) == {"API_KEY": "api-key"}

        status_json = tether("status", run.id, "--json", controller=mesh.address)
        status_table = tether("status", run.id, controller=mesh.address)
        assert status_json.returncode == 0 and status_table.returncode == 0
        assert '"envSecrets": {\n' in status_json.stdout
        assert '"API_KEY": "api-key"' in status_json.stdout
        replies = [
            client.get_run(run.id).SerializeToString(),
            *(r.SerializeToString() for r in client.list_runs()),
            *(e.SerializeToString() for e in client.watch(run.id, timeout=10)),
            "\n".join(client.list_secrets()).encode(),
        ]
        wanted = {"submit uses-secret"} | {
            f"{step} {task}" for step in ("dispatch", "run", "record") for task in ("call", "after")
        }
        mesh.wait_for(lambda: wanted <= {s.name for _, s in receiver.spans}, 15, "spans exported")
    finally:
        mesh.close()

    secret = value.encode()
    dump = _etcd_dump(etcd.endpoint, prefix)
    stored = dict(dump)[f"{prefix}/secrets/api-key".encode()]
    assert secret not in stored and len(stored) > len(secret)
    for key, val in dump:
        assert secret not in key + val, f"etcd {key!r} holds the secret"

    log_text = logs.getvalue()
    assert '"run submitted"' in log_text and '"secret set"' in log_text  # logs were captured
    assert value not in log_text, "a log line holds the secret"

    spans = [s for _, s in receiver.spans]
    assert wanted <= {s.name for s in spans}
    for span in spans:
        assert secret not in span.SerializeToString(), f"span {span.name} holds the secret"

    for out in (status_json.stdout, status_json.stderr, status_table.stdout):
        assert value not in out
    for reply in replies:
        assert secret not in reply

    files = [p for p in (tmp_path / "agents").rglob("*") if p.is_file()]
    stdout_logs = [p for p in files if secret in p.read_bytes()]
    assert [p.relative_to(tmp_path / "agents").as_posix() for p in stdout_logs] == [
        f"n1/{run.id}/call/1/stdout.log"
    ]
    # The inputs and logs of both attempts were looked at (their final reports are removed
    # once acknowledged).
    looked_at = {p.relative_to(tmp_path / "agents").as_posix() for p in files}
    assert {
        f"n1/{run.id}/{task}/1/{name}"
        for task in ("call", "after")
        for name in ("inputs.json", "stdout.log")
    } <= looked_at


def test_missing_secret_is_refused_at_submit_naming_the_field(smesh, etcd, prefix, tmp_path):
    client = smesh.client()
    client.set_secret("present", "v")
    before = _etcd_dump(etcd.endpoint, prefix)
    wf = Workflow("missing")
    wf.task("a", py("pass"), env={"OK": Secret("present")})
    wf.task("b", py("pass"))
    wf.task("c", py("pass"), env={"API_KEY": Secret("x")})
    with pytest.raises(InvalidSpecError) as e:
        client.submit(wf)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value) == 'tasks[2] (c).env.API_KEY: secret "x" does not exist'
    assert _etcd_dump(etcd.endpoint, prefix) == before

    spec = tmp_path / "wf.yaml"
    spec.write_text(
        "name: missing\ntasks:\n  - name: a\n    command: [echo]\n    env: {API_KEY: {secret: x}}\n"
    )
    res = tether("submit", str(spec), controller=smesh.address)
    assert_one_line_error(res, 'tasks[0] (a).env.API_KEY: secret "x" does not exist')


def test_cli_sets_lists_names_only_and_deletes(smesh, etcd, prefix):
    def cli_set(name, data):
        return subprocess.run(
            [sys.executable, "-m", "tether.sdk.cli", "secrets", "set", name],
            input=data,
            capture_output=True,
            env={**os.environ, "TETHER_CONTROLLER": smesh.address},
            timeout=30,
        )

    assert cli_set("beta", b"value-of-beta\n").returncode == 0
    res = cli_set("alpha", b"value-of-alpha")
    assert res.returncode == 0 and b"created" in res.stdout
    assert b"replaced" in cli_set("alpha", b"value-of-alpha-2\n").stdout
    listed = tether("secrets", "list", controller=smesh.address)
    assert listed.returncode == 0
    assert listed.stdout == "alpha\nbeta\n"
    assert "value" not in listed.stdout

    # One trailing newline from stdin is dropped; the rest reaches the task as it was set.
    wf = Workflow("cli")
    wf.task("show", py("import os; print(repr(os.environ['B']))"), env={"B": Secret("beta")})
    client = smesh.client()
    run = client.submit(wf)
    assert run.wait(timeout=30).state == SUCCEEDED
    out = b"".join(c.data for c in client.logs(run.id, "show"))
    assert out == b"'value-of-beta'\n"

    res = tether("secrets", "delete", "beta", controller=smesh.address)
    assert res.returncode == 0
    assert tether("secrets", "list", controller=smesh.address).stdout == "alpha\n"
    assert f"{prefix}/secrets/beta".encode() not in dict(_etcd_dump(etcd.endpoint, prefix))
    res = tether("secrets", "delete", "beta", controller=smesh.address)
    assert_one_line_error(res, 'secret "beta" does not exist')
    with pytest.raises(NotFoundError):
        client.delete_secret("beta")


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("bad name", b"v", "name"),
        ("ok", b"", "value"),
        ("ok", b"a\0b", "value"),
        ("ok", b"\xff\xfe", "value"),
        ("ok", b"x" * (32 * 1024 + 1), "value"),
    ],
)
def test_bad_set_requests_name_the_field(smesh, name, value, field):
    with pytest.raises(InvalidSpecError) as e:
        smesh.client().set_secret(name, value)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value).startswith(f"{field}: ")
    assert smesh.client().list_secrets() == []


def test_secret_deleted_after_submit_fails_the_attempt_not_the_controller(smesh):
    client = smesh.client()
    client.set_secret("short-lived", "v")
    wf = Workflow("deleted")
    first = wf.task("first", py("import time; time.sleep(1.0)"))
    wf.task("second", py("pass"), depends_on=[first], env={"K": Secret("short-lived")})
    run = client.submit(wf)
    smesh.wait_for(
        lambda: by_name(client.get_run(run.id))["first"].state == t.TaskState.TASK_STATE_RUNNING,
        10,
        "first task running",
    )
    client.delete_secret("short-lived")
    final = run.wait(timeout=30)
    second = by_name(final)["second"]
    assert second.state == t.TaskState.TASK_STATE_FAILED
    assert second.reason == "runtime_error"
    assert 'secret "short-lived" does not exist' in second.message


def test_without_a_key_file_secrets_are_refused_naming_the_flag(mesh, tmp_path):
    client = mesh.client()
    for call in (
        lambda: client.set_secret("a", "v"),
        client.list_secrets,
        lambda: client.delete_secret("a"),
    ):
        with pytest.raises(FailedPreconditionError, match="--secrets-key-file"):
            call()
    wf = Workflow("nokey")
    wf.task("a", py("pass"), env={"K": Secret("a")})
    with pytest.raises(FailedPreconditionError, match="--secrets-key-file"):
        client.submit(wf)
    res = tether("secrets", "list", controller=mesh.address)
    assert_one_line_error(res, "--secrets-key-file")


def test_a_controller_with_another_key_refuses_clearly(etcd, prefix, tmp_path, key_file):
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", secrets_key_file=key_file)
    try:
        m.start_controller()
        m.client().set_secret("api-key", "v")
        m.stop_controller()
        m.start_controller(secrets_key_file=_key_file(tmp_path / "other.key"))
        wf = Workflow("otherkey")
        wf.task("a", py("pass"), env={"K": Secret("api-key")})
        with pytest.raises(InvalidSpecError) as e:
            m.client().submit(wf)
        assert "tasks[0] (a).env.K" in str(e.value)
        assert "another --secrets-key-file" in str(e.value)
    finally:
        m.close()


@pytest.mark.parametrize("content", [b"", b"too short", b"x" * 33])
def test_bad_key_file_stops_the_controller_with_one_line(etcd, prefix, tmp_path, content):
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    res = tether(
        "controller",
        "--etcd",
        etcd.endpoint,
        "--prefix",
        prefix,
        "--listen",
        "127.0.0.1:0",
        "--secrets-key-file",
        str(bad),
        timeout=30,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "--secrets-key-file" in res.stderr
    assert "32 random bytes, raw or base64" in res.stderr
