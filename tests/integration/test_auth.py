"""Users and tokens against a real etcd and real controllers: every refusal has the right code,
one clear line in the CLI, and leaves etcd exactly as it was."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2
from helpers import (
    ControllerProcess,
    Mesh,
    R,
    assert_one_line_error,
    etcd_dump,
    health,
    tether,
    wait_for,
)

from tether.api.v1 import controller_pb2
from tether.controller.server import ControllerServer
from tether.sdk import Workflow
from tether.sdk.client import Client
from tether.sdk.errors import (
    FailedPreconditionError,
    InvalidSpecError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
)


@pytest.fixture
def auth_mesh(etcd, prefix, tmp_path):
    """A controller with --auth (no TLS), bootstrapped; yields (mesh, admin token)."""
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents", auth=True)
    m.start_controller()
    with Client(m.address, token="") as c:
        token, info = c.bootstrap_acl()
    assert info.role == "admin" and info.name == "admin"
    yield m, token
    m.close()


def _client(mesh: Mesh, token: str) -> Client:
    c = Client(mesh.address, timeout=10, token=token)
    mesh._clients.append(c)
    return c


def _wf(name: str = "idle") -> Workflow:
    wf = Workflow(name)
    wf.task("a", [sys.executable, "-c", "print('hi')"], cpu=0.1)
    return wf


@pytest.fixture
def workflow_file(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(
        'name: cli\ntasks:\n  - name: a\n    resources: {cpu: 0.1}\n    command: ["true"]\n'
    )
    return str(path)


def _cli(mesh: Mesh, token: str, *args: str):
    return tether("--token", token, *args, controller=mesh.address)


def test_bootstrap_once_then_refused(auth_mesh, etcd, prefix):
    mesh, admin = auth_mesh
    before = etcd_dump(etcd.endpoint, prefix)
    res = tether("acl", "bootstrap", controller=mesh.address)
    assert_one_line_error(res, "already bootstrapped")
    with pytest.raises(FailedPreconditionError):
        _client(mesh, "").bootstrap_acl("other")
    assert etcd_dump(etcd.endpoint, prefix) == before
    # The token is stored hashed: its secret part appears nowhere in etcd.
    secret = admin.rpartition(".")[2]
    assert all(secret.encode() not in v for v in before.values())
    assert admin.encode() not in b"".join(before.values())


def test_cli_bootstrap_prints_the_token_once(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path, auth=True)
    mesh.start_controller()
    try:
        res = tether("acl", "bootstrap", controller=mesh.address)
        assert res.returncode == 0, res.stderr
        token = res.stdout.strip()
        assert token.startswith("admin.") and "shown only once" in res.stderr
        res = _cli(mesh, token, "tokens", "create", "ci", "--role", "submitter", "--ttl", "30d")
        assert res.returncode == 0, res.stderr
        ci = res.stdout.strip()
        listed = _cli(mesh, token, "tokens", "list", "--json")
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows["ci"]["role"] == "submitter" and rows["ci"]["createdBy"] == "admin"
        assert "expiresAt" in rows["ci"] and "expiresAt" not in rows["admin"]
        assert ci not in listed.stdout and "sha256" not in listed.stdout
        res = _cli(mesh, token, "tokens", "revoke", "ci")
        assert res.returncode == 0, res.stderr
        assert_one_line_error(_cli(mesh, ci, "nodes"), "not valid")
        # A zero lifetime is refused, not taken for "never expires".
        res = _cli(mesh, token, "tokens", "create", "zero", "--role", "viewer", "--ttl", "0s")
        assert_one_line_error(res, "ttl")
        request = controller_pb2.CreateTokenRequest(name="zero", role="viewer")
        request.ttl.nanos = 1
        with Client(mesh.address, timeout=10, token=token) as c:
            with pytest.raises(InvalidSpecError, match="ttl"):
                c._call("CreateToken", request)
            assert "zero" not in {i.name for i in c.list_tokens()}
    finally:
        mesh.close()


def test_refusals_have_the_right_code_one_line_and_change_nothing(
    auth_mesh, etcd, prefix, workflow_file
):
    mesh, admin = auth_mesh
    a = _client(mesh, admin)
    viewer, _ = a.create_token("vera", "viewer")
    expired, _ = a.create_token("old", "submitter", ttl=0.2)
    revoked, _ = a.create_token("gone", "submitter")
    a.revoke_token("gone")
    run = _client(mesh, admin).submit(_wf())
    time.sleep(0.3)  # past the expiry of "old"
    before = etcd_dump(etcd.endpoint, prefix)

    cases = [
        ("", UnauthenticatedError, "no token"),
        ("not-a-token", UnauthenticatedError, "malformed token"),
        (expired, UnauthenticatedError, "expired"),
        (revoked, UnauthenticatedError, "not valid"),
        (admin + "0", UnauthenticatedError, "not valid"),
        (viewer, PermissionDeniedError, "needs role submitter"),
    ]
    for token, error, words in cases:
        c = _client(mesh, token)
        with pytest.raises(error, match=words):
            c.submit(_wf())
        with pytest.raises(error, match=words):
            c.cancel(run.id)
        assert_one_line_error(_cli(mesh, token, "submit", workflow_file), words)
        assert_one_line_error(_cli(mesh, token, "cancel", run.id), words)
        if error is UnauthenticatedError:  # reads and streams too
            with pytest.raises(error):
                c.get_run(run.id)
            with pytest.raises(error):
                list(c.watch(run.id))
            assert_one_line_error(_cli(mesh, token, "status", run.id), words)
        assert_one_line_error(
            _cli(mesh, token, "tokens", "create", "x", "--role", "admin"),
            words if error is UnauthenticatedError else "needs role admin",
        )
    assert etcd_dump(etcd.endpoint, prefix) == before


def test_roles_table_and_submitted_by(auth_mesh):
    mesh, admin = auth_mesh
    a = _client(mesh, admin)
    tokens = {role: a.create_token(role[:3] + "-user", role)[0] for role in ("viewer", "submitter")}
    tokens["submitter2"] = a.create_token("sub-two", "submitter")[0]
    tokens["operator"] = a.create_token("op-user", "operator")[0]
    viewer, sub, sub2, op = (
        _client(mesh, tokens[k]) for k in ("viewer", "submitter", "submitter2", "operator")
    )

    assert viewer.nodes() == [] and list(viewer.list_runs()) == []
    with pytest.raises(PermissionDeniedError, match="needs role submitter"):
        viewer.submit(_wf())

    mine = sub.submit(_wf())
    theirs = sub2.submit(_wf())
    assert mine.status().submitted_by == "sub-user"
    assert viewer.get_run(theirs.id).submitted_by == "sub-two"
    with pytest.raises(PermissionDeniedError, match="needs role operator"):
        sub.cancel(theirs.id)
    sub.cancel(mine.id)
    op.cancel(theirs.id)
    for handle in (mine, theirs):
        assert handle.wait(10).state == R.RUN_STATE_CANCELLED

    for c in (viewer, sub, op):
        with pytest.raises(PermissionDeniedError, match="needs role admin"):
            c.list_tokens()
        with pytest.raises(PermissionDeniedError, match="needs role admin"):
            c.create_token("x", "viewer")
    assert {t.name for t in a.list_tokens()} == {
        "admin",
        "vie-user",
        "sub-user",
        "sub-two",
        "op-user",
    }
    # The health probe needs no token.
    assert health(mesh.address, "") == health_pb2.HealthCheckResponse.SERVING


def test_agents_carry_an_operator_token_where_no_node_certificates_are_checked(auth_mesh):
    """Tokens checked, node certificates not (--auth without --tls-ca): an agent is refused
    without a token, or with one of a role below operator, and exits saying so; with an
    operator token it registers and runs tasks."""
    from tether.agent.agent import AgentRefused

    mesh, admin = auth_mesh
    admin_client = _client(mesh, admin)
    viewer, _ = admin_client.create_token("looker", "viewer")
    for token, code in (("", "UNAUTHENTICATED"), (viewer, "PERMISSION_DENIED")):
        agent = mesh.add_agent(f"node-{code.lower()}", wait=False, token=token)
        _agent, fut = mesh.agents.pop(agent.config.node)
        with pytest.raises(AgentRefused, match=code):
            fut.result(10)
    assert admin_client.nodes() == []
    agents_token, _ = admin_client.create_token("agents", "operator")
    mesh.add_agent("node-a", token=agents_token)
    sub_token, _ = admin_client.create_token("sub", "submitter")
    final = _client(mesh, sub_token).submit(_wf("real")).wait(30)
    assert final.state == R.RUN_STATE_SUCCEEDED, final
    assert final.submitted_by == "sub"


def test_revoked_on_one_controller_is_refused_at_once_on_the_other(auth_mesh):
    mesh, admin = auth_mesh
    leader = mesh.controller
    standby = ControllerServer(replace(leader.config, listen="127.0.0.1:0"))
    mesh.call(standby.start(wait_for_leadership=False))
    try:
        assert not standby.is_leader
        on_leader = _client(mesh, admin)
        on_standby = Client(standby.address, timeout=10, token=admin)
        mesh._clients.append(on_standby)

        # Revoked through the standby: the leader, which accepted it just before, refuses it.
        first, _ = on_standby.create_token("first", "viewer")
        assert _client(mesh, first).nodes() == []
        on_standby.revoke_token("first")
        with pytest.raises(UnauthenticatedError, match="not valid"):
            _client(mesh, first).nodes()

        # Revoked through the leader: the standby refuses it at once (before, it let the call
        # through to its leadership check, which answers "not the leader").
        second, _ = on_leader.create_token("second", "viewer")
        standby_client = Client(standby.address, timeout=10, token=second)
        mesh._clients.append(standby_client)
        with pytest.raises(NotFoundError):  # the standby let it through, to the leader it named
            standby_client.get_run("r")
        on_leader.revoke_token("second")
        standby_client = Client(standby.address, timeout=10, token=second)
        mesh._clients.append(standby_client)
        with pytest.raises(UnauthenticatedError, match="not valid"):
            standby_client.get_run("r")
    finally:
        mesh.call(standby.stop(grace=0.5))


def test_rate_limit_answers_resource_exhausted_with_retry_info(etcd, prefix, tmp_path):
    mesh = Mesh(etcd.endpoint, prefix, tmp_path, auth=True, rate_limit=5, rate_burst=3)
    mesh.start_controller()
    try:
        admin, _ = _client(mesh, "").bootstrap_acl()
        c = _client(mesh, admin)
        other = _client(mesh, c.create_token("other", "viewer")[0])
        with pytest.raises(RateLimitedError) as refused:
            for _ in range(10):
                c.nodes()
        err = refused.value
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.message
        assert err.retry_after is not None and 0 < err.retry_after <= 1 / 5 + 0.01
        assert other.nodes() == []  # a bucket per token
        time.sleep(err.retry_after)
        assert c.nodes() == []
    finally:
        mesh.close()


def test_every_mutating_call_writes_an_audit_line(etcd, prefix, tmp_path, workflow_file):
    log_path = tmp_path / "controller.log"
    proc = ControllerProcess(etcd.endpoint, prefix, log_path, extra_args=("--auth",))
    proc.start(leader=False)
    try:
        wait_for(
            lambda: (
                health(proc.address, "tether.v1.ControllerService")
                == health_pb2.HealthCheckResponse.SERVING
            ),
            30,
            "the controller to lead",
        )
        with Client(proc.address, token="") as anon:
            admin, _ = anon.bootstrap_acl()
        with Client(proc.address, token=admin) as c:
            sub, _ = c.create_token("sub", "submitter")
            view, _ = c.create_token("view", "viewer")
        with Client(proc.address, token=sub) as c:
            run_id = c.submit(_wf()).id
            c.nodes()  # a read: no audit line
        with Client(proc.address, token=view) as c, pytest.raises(PermissionDeniedError):
            c.cancel(run_id)

        def audits():
            lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
            return [x for x in lines if x.get("event") == "audit"]

        wait_for(lambda: len(audits()) >= 5, 10, "five audit lines")
        got = [(a["who"], a["role"], a["method"], a["run_id"], a["result"]) for a in audits()]
        assert got == [
            ("anonymous", "", "BootstrapAcl", "", "OK"),
            ("admin", "admin", "CreateToken", "", "OK"),
            ("admin", "admin", "CreateToken", "", "OK"),
            ("sub", "submitter", "SubmitWorkflow", run_id, "OK"),
            ("view", "viewer", "CancelRun", run_id, "PERMISSION_DENIED"),
        ]
    finally:
        proc.stop()


def test_without_auth_everyone_may_and_nothing_is_recorded(mesh):
    c = mesh.client()
    run = c.submit(_wf())
    assert run.status().submitted_by == ""
    c.cancel(run.id)
    token, _ = c.bootstrap_acl()  # open, but only meaningful once auth is switched on
    assert token.startswith("admin.")
