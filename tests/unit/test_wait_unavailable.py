"""``RunHandle.wait`` while no controller answers: it keeps asking, with pauses that grow,
until its own timeout; an error that is not about availability ends it at once."""

from __future__ import annotations

import time

import grpc
import pytest

from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk import NotFoundError, TimeoutError, UnavailableError
from tether.sdk.client import RunHandle

DONE = t.RunState.RUN_STATE_SUCCEEDED


class _Away:
    """A controller that is down for ``outage`` watches (forever with None), then serves."""

    def __init__(self, outage: int | None, error=UnavailableError) -> None:
        self.outage, self.error = outage, error
        self.watches: list[float] = []
        self.read_timeouts: list[float | None] = []

    def watch(self, run_id, revision, timeout=None, run_only=False):
        self.watches.append(time.monotonic())
        if self.outage is None or len(self.watches) <= self.outage:
            raise self.error("connection refused", grpc.StatusCode.UNAVAILABLE)
        yield controller_pb2.RunEvent(revision=9, snapshot=t.Run(id=run_id, state=DONE))

    timeout = 30.0

    def get_run(self, run_id, timeout=None):
        self.read_timeouts.append(timeout)
        return t.Run(id=run_id, state=DONE)


def test_wait_keeps_asking_until_the_controller_is_back():
    controller = _Away(outage=4)
    assert RunHandle(controller, "r1").wait(timeout=10).state == DONE
    gaps = [b - a for a, b in zip(controller.watches, controller.watches[1:], strict=False)]
    assert len(gaps) == 4 and gaps[-1] > gaps[0]  # growing pauses


def test_wait_gives_up_at_its_timeout_naming_the_outage():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish in 0\.6s") as info:
        RunHandle(_Away(outage=None), "r1").wait(timeout=0.6)
    assert 0.55 < time.monotonic() - t0 < 2
    assert isinstance(info.value.__cause__, UnavailableError)


def test_other_errors_raise_at_once():
    controller = _Away(outage=None, error=lambda msg, code: NotFoundError("run r1 not found"))
    with pytest.raises(NotFoundError):
        RunHandle(controller, "r1").wait(timeout=10)
    assert len(controller.watches) == 1


def test_the_client_reconnects_to_a_controller_back_from_an_outage_within_seconds(monkeypatch):
    # gRPC's own default lets the pause between reconnects grow to 120 s: a wait() that rode
    # out a long restart would go on for up to two minutes after the controller is back.
    import grpc as grpc_mod

    from tether.sdk import Client

    seen = []
    real = grpc_mod.insecure_channel
    monkeypatch.setattr(
        grpc_mod, "insecure_channel", lambda a, options=None: seen.append(options) or real(a)
    )
    with Client("127.0.0.1:1,127.0.0.1:2"):
        pass
    assert len(seen) == 2
    for options in seen:
        assert dict(options)["grpc.max_reconnect_backoff_ms"] <= 2000
