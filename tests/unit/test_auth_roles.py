"""The role table, the caller's rights and the token bucket: pure logic, no servers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tether.api.v1 import controller_pb2
from tether.controller.auth import (
    MUTATING,
    Principal,
    Role,
    TokenBucket,
    auth_required,
    is_open,
    required_role,
)
from tether.controller.config import ControllerConfig

SVC = "/tether.v1.ControllerService/"


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("GetRun", Role.VIEWER),
        ("ListRuns", Role.VIEWER),
        ("WatchRun", Role.VIEWER),
        ("StreamLogs", Role.VIEWER),
        ("ListNodes", Role.VIEWER),
        ("SubmitWorkflow", Role.SUBMITTER),
        ("CancelRun", Role.SUBMITTER),
        ("CordonNode", Role.OPERATOR),
        ("UncordonNode", Role.OPERATOR),
        ("DrainNode", Role.OPERATOR),
        ("CreateToken", Role.ADMIN),
        ("ListTokens", Role.ADMIN),
        ("RevokeToken", Role.ADMIN),
        ("SetSecret", Role.ADMIN),
        ("ListSecrets", Role.ADMIN),
        ("SomethingAddedLater", Role.ADMIN),
    ],
)
def test_role_table(method, role):
    assert required_role(SVC + method) is role


def test_only_the_admin_rpcs_fall_through_to_admin():
    # An RPC missing from the table needs admin; this catches one added without a decision.
    methods = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].methods
    admin_only = {
        m.name for m in methods if not is_open(SVC + m.name) and required_role(SVC + m.name) == 4
    }
    assert admin_only <= {
        "CreateToken",
        "ListTokens",
        "RevokeToken",
        "SetSecret",
        "ListSecrets",
        "DeleteSecret",
    }
    assert {"CreateToken", "ListTokens", "RevokeToken"} <= admin_only


def test_roles_include_the_ones_below():
    assert [r.label for r in sorted(Role)] == ["viewer", "submitter", "operator", "admin"]
    op = Principal("o", Role.OPERATOR)
    assert op.may(Role.VIEWER) and op.may(Role.SUBMITTER) and op.may(Role.OPERATOR)
    assert not op.may(Role.ADMIN)
    assert Role.parse("Submitter") is Role.SUBMITTER
    with pytest.raises(ValueError, match="known: viewer, submitter, operator, admin"):
        Role.parse("root")


def test_open_methods():
    assert is_open("/grpc.health.v1.Health/Check")
    assert is_open(SVC + "BootstrapAcl")
    assert is_open("/tether.v1.AgentService/Connect")  # node certificates, not tokens
    assert not is_open(SVC + "GetRun")
    assert SVC + "SubmitWorkflow" in MUTATING and SVC + "GetRun" not in MUTATING


def test_auth_is_on_with_the_flag_or_with_tls():
    assert not auth_required(ControllerConfig())
    assert auth_required(ControllerConfig(auth=True))
    assert auth_required(SimpleNamespace(auth=False, tls_cert="/etc/tether/controller.pem"))


def test_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=2, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token comes back every 1/rate s
    assert b.take(0.25) == pytest.approx(0.25)
    assert b.take(0.5) == 0
    assert b.take(0.5) > 0


def test_bucket_refills_to_burst_only():
    b = TokenBucket(rate=10, burst=2, now=0.0)
    b.take(0.0)
    b.take(0.0)
    # A long idle time gives back at most `burst` requests.
    assert [b.take(100.0) for _ in range(3)] == [0, 0, pytest.approx(0.1)]


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0)
