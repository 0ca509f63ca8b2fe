"""The SDK's TimeoutError is Python's too: ``except TimeoutError`` catches ``run.wait``'s
timeout without importing the SDK's name, and ``except TetherError`` still does."""

from __future__ import annotations

import builtins
import time

import grpc
import pytest

import tether.sdk
from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk import TetherError
from tether.sdk.client import RunHandle
from tether.sdk.errors import from_rpc_error

RUNNING = t.RunState.RUN_STATE_RUNNING


class _Deadline(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "Deadline Exceeded"


class _NeverEnds:
    """A run that keeps running: a watch ends only when its deadline does, as gRPC's would."""

    def watch(self, run_id, revision, timeout=None, run_only=False):
        yield controller_pb2.RunEvent(revision=3, snapshot=t.Run(id=run_id, state=RUNNING))
        time.sleep(timeout)
        raise from_rpc_error(_Deadline())

    def get_run(self, run_id):
        return t.Run(id=run_id, state=RUNNING)


def test_the_sdk_timeout_error_is_the_builtin_one_and_exported():
    err = from_rpc_error(_Deadline())
    assert type(err) is tether.sdk.TimeoutError
    assert isinstance(err, builtins.TimeoutError) and isinstance(err, TetherError)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and str(err) == "Deadline Exceeded"
    assert "TimeoutError" in tether.sdk.__all__


def test_a_wait_timeout_is_caught_by_the_builtin_name():
    run = RunHandle(_NeverEnds(), "r1", existing=True)
    t0 = time.monotonic()
    with pytest.raises(builtins.TimeoutError, match=r"r1 did not finish in 0\.3s") as info:
        run.wait(timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value, TetherError)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
