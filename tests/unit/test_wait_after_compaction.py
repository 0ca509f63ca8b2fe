"""``RunHandle.wait`` when the history it would resume from was compacted (etcd's, or the
controller's ``etcd_compaction_interval``): it starts again from a snapshot instead of
failing a run that is doing fine."""

from __future__ import annotations

import grpc
import pytest

from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.sdk.client import RunHandle
from tether.sdk.errors import TetherError

RUNNING = t.RunState.RUN_STATE_RUNNING
DONE = t.RunState.RUN_STATE_SUCCEEDED


class _Controller:
    """Answers watches as a controller does after a failover past a compaction: a resume
    from an old revision is OUT_OF_RANGE; a watch from 0 starts with a snapshot."""

    def __init__(self, resume_error: grpc.StatusCode) -> None:
        self.resume_error = resume_error
        self.watches: list[int] = []
        self.state = RUNNING

    def watch(self, run_id, revision, timeout=None, run_only=False):
        self.watches.append(revision)
        if revision:
            raise TetherError("revision 5 was compacted (oldest is 15)", self.resume_error)
        if len(self.watches) == 1:  # the first stream: a snapshot, then the stream breaks
            yield controller_pb2.RunEvent(revision=5, snapshot=t.Run(id=run_id, state=RUNNING))
            raise TetherError("controller went away", grpc.StatusCode.UNAVAILABLE)
        self.state = DONE
        yield controller_pb2.RunEvent(revision=20, snapshot=t.Run(id=run_id, state=DONE))

    timeout = 30.0

    def get_run(self, run_id, timeout=None):
        return t.Run(id=run_id, state=self.state)


def test_a_compacted_resume_starts_again_from_a_snapshot():
    controller = _Controller(grpc.StatusCode.OUT_OF_RANGE)
    run = RunHandle(controller, "r1", existing=True)
    assert run.wait(timeout=5).state == DONE
    assert controller.watches == [0, 5, 0]


def test_other_errors_on_resume_still_raise():
    controller = _Controller(grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(TetherError, match="compacted"):
        RunHandle(controller, "r1", existing=True).wait(timeout=5)
