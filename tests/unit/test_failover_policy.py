"""The agent's reconnect policy, the standby's hints, and what etcd failures are called."""

from __future__ import annotations

import grpc
import pytest
from etcd3aio import EtcdConnectionError, EtcdTransientError

from tether.agent.reconnect import Reconnect
from tether.controller.config import ControllerConfig, advertised
from tether.controller.errors import NotLeader, status_for, store_unavailable, trailers_for
from tether.sdk.errors import ERROR_REASON_KEY, LEADER_KEY


class _Meta(grpc.RpcError):
    def __init__(self, metadata) -> None:
        self._metadata = metadata

    def trailing_metadata(self):
        return self._metadata


def test_a_named_leader_is_next_at_once_even_when_not_listed():
    r = Reconnect(["a:1", "b:1"], initial=0.2, maximum=10)
    err = _Meta(((ERROR_REASON_KEY, "not_leader"), (LEADER_KEY, "c:1")))
    wait = r.after(False, err)
    assert r.address == "c:1" and wait <= 0.05
    assert r.controllers == ["a:1", "b:1", "c:1"]
    # Named again while there: no loop onto itself, the next one is tried instead.
    r.after(False, err)
    assert r.address == "a:1"


def test_down_controllers_back_off_but_a_live_standby_keeps_the_delay_short():
    r = Reconnect(["a:1", "b:1"], initial=0.2, maximum=10)
    waits = [r.after(False, None) for _ in range(6)]
    assert waits[-1] > 2 * max(waits[:2])  # exponential when nobody answers
    standby = _Meta(((ERROR_REASON_KEY, "not_leader"),))
    assert r.after(False, standby) <= 0.2  # a controller that will lead soon: no backoff
    etcd_down = _Meta(((ERROR_REASON_KEY, "store_unavailable"),))
    for _ in range(5):
        assert r.after(False, etcd_down) <= 0.2
    r.after(False, None)
    assert r.after(True, None) <= 0.2  # it had registered: reconnect quickly


def test_a_standby_names_the_leader_and_asks_not_to_be_retried():
    trailers = dict(trailers_for(NotLeader("standing by", "10.0.0.1:7070")))
    assert trailers[LEADER_KEY] == "10.0.0.1:7070"
    assert trailers[ERROR_REASON_KEY] == "not_leader"
    assert trailers["grpc-retry-pushback-ms"] == "-1"
    assert LEADER_KEY not in dict(trailers_for(NotLeader("no leader yet")))


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (EtcdTransientError("Lease.Grant failed after 3 attempts: DEADLINE_EXCEEDED"), "no quorum"),
        (EtcdConnectionError("KV.Range failed: UNAVAILABLE (etcdserver: no leader)"), "no quorum"),
        (EtcdConnectionError("KV.Range failed: UNAVAILABLE (connection refused)"), "unreachable"),
        (TimeoutError(), "no quorum"),
    ],
)
def test_etcd_failures_say_no_quorum_or_unreachable(exc, words):
    code, message = status_for(exc)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message.startswith("etcd") and words in message, message
    assert words in str(store_unavailable(exc, "http://127.0.0.1:2379"))
    assert dict(trailers_for(exc))[ERROR_REASON_KEY] == "store_unavailable"


def test_advertise_defaults_from_listen():
    assert advertised("127.0.0.1:0", 4321) == "127.0.0.1:4321"
    wildcard = advertised("0.0.0.0:7070", 7070)
    assert not wildcard.startswith("0.0.0.0") and wildcard.endswith(":7070")
    with pytest.raises(ValueError, match="advertise"):
        ControllerConfig(advertise="no-port")
    with pytest.raises(ValueError, match="leader_ttl"):
        ControllerConfig(leader_ttl=1)
