"""Client.follow and wait(): a resumed watch loses no event that shared a revision with one
already seen, a run followed from its last revision still ends, a controller answering
"not yet" is not asked ten times a second, and wait()'s last read keeps within its timeout.
(Fake controllers: the stream breaks where the test says.)"""

from __future__ import annotations

import asyncio

import grpc

from tether.api.v1 import controller_pb2
from tether.api.v1 import types_pb2 as t
from tether.controller.records import RunEntry
from tether.controller.run_watch import RunWatch
from tether.sdk import Client, UnavailableError
from tether.sdk import client as client_mod
from tether.sdk.client import RunHandle, _follow, _Patience

R, S = t.RunState, t.TaskState


def task_event(name: str, rev: int) -> controller_pb2.RunEvent:
    return controller_pb2.RunEvent(
        task=t.TaskRun(spec=t.TaskSpec(name=name), state=S.TASK_STATE_READY), revision=rev
    )


class _Breaking:
    """Serves ``streams`` one per watch; a stream ending in an exception breaks there."""

    timeout = 30.0

    def __init__(self, *streams) -> None:
        self.streams = list(streams)
        self.asked: list[int] = []

    def watch(self, run_id, revision, timeout=None, run_only=False):
        self.asked.append(revision)
        for item in self.streams.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def test_a_resume_gets_the_rest_of_a_revision_once():
    snapshot = controller_pb2.RunEvent(snapshot=t.Run(id="r1", state=R.RUN_STATE_RUNNING))
    snapshot.revision = 5
    broken = UnavailableError("controller restarting", grpc.StatusCode.UNAVAILABLE)
    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=8)
    controller = _Breaking(
        # One transaction made a, b and c READY at revision 7; the stream broke after a.
        [snapshot, task_event("a", 7), broken],
        [task_event("a", 7), task_event("b", 7), task_event("c", 7), end],
    )
    events = list(_follow(controller, "r1", _Patience("r1", 10, first=0.01)))
    assert controller.asked == [0, 6]  # from the revision before: the rest of 7 comes again
    names = [e.task.spec.name for e in events if e.HasField("task")]
    assert names == ["a", "b", "c"] and events[-1] == end


def _run_states(events) -> list[tuple[int, int]]:
    return [(e.run_state, e.revision) for e in events if not e.HasField("task")]


def test_a_resume_yields_a_restated_run_state_only_when_it_was_missed():
    broken = UnavailableError("controller restarting", grpc.StatusCode.UNAVAILABLE)
    snapshot = controller_pb2.RunEvent(snapshot=t.Run(id="r1", state=R.RUN_STATE_PENDING))
    snapshot.revision = 5
    snapshot.run_state = R.RUN_STATE_PENDING
    running = controller_pb2.RunEvent(run_state=R.RUN_STATE_RUNNING, revision=6)
    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=9)
    # The run's RUNNING (6) had not come when the stream broke after a task change of 7: the
    # resume's restatement is the only news of it.
    missed = _Breaking(
        [snapshot, task_event("a", 7), broken],
        [running, task_event("b", 8), end],
    )
    events = list(_follow(missed, "r1", _Patience("r1", 10, first=0.01)))
    assert missed.asked == [0, 6]
    assert _run_states(events) == [
        (R.RUN_STATE_PENDING, 5),
        (R.RUN_STATE_RUNNING, 6),
        (R.RUN_STATE_SUCCEEDED, 9),
    ]
    # Seen before the break: the restatement is not yielded again.
    seen = _Breaking(
        [snapshot, running, task_event("a", 7), broken],
        [running, task_event("b", 8), end],
    )
    events = list(_follow(seen, "r1", _Patience("r1", 10, first=0.01)))
    assert _run_states(events) == [
        (R.RUN_STATE_PENDING, 5),
        (R.RUN_STATE_RUNNING, 6),
        (R.RUN_STATE_SUCCEEDED, 9),
    ]
    assert [e.task.spec.name for e in events if e.HasField("task")] == ["a", "b"]


def test_a_resume_right_after_a_run_change_does_not_go_back_to_the_state_before():
    broken = UnavailableError("controller restarting", grpc.StatusCode.UNAVAILABLE)
    snapshot = controller_pb2.RunEvent(snapshot=t.Run(id="r1", state=R.RUN_STATE_PENDING))
    snapshot.revision, snapshot.run_state = 4, R.RUN_STATE_PENDING
    running = controller_pb2.RunEvent(run_state=R.RUN_STATE_RUNNING, revision=5)
    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=6)
    # The stream broke right after RUNNING (5): the resume from 4 restates the run as of 4
    # (PENDING, changed at 3), then sends RUNNING again.
    restated = controller_pb2.RunEvent(run_state=R.RUN_STATE_PENDING, revision=3)
    controller = _Breaking([snapshot, running, broken], [restated, running, end])
    events = list(_follow(controller, "r1", _Patience("r1", 10, first=0.01)))
    assert controller.asked == [0, 4]
    assert _run_states(events) == [
        (R.RUN_STATE_PENDING, 4),
        (R.RUN_STATE_RUNNING, 5),
        (R.RUN_STATE_SUCCEEDED, 6),
    ]


def test_a_task_sent_again_with_a_newer_run_state_is_not_yielded_twice():
    broken = UnavailableError("controller restarting", grpc.StatusCode.UNAVAILABLE)
    snapshot = controller_pb2.RunEvent(snapshot=t.Run(id="r1", state=R.RUN_STATE_RUNNING))
    snapshot.revision, snapshot.run_state = 2, R.RUN_STATE_RUNNING
    a, b = task_event("a", 3), task_event("b", 3)
    a_again = task_event("a", 3)
    a_again.run_state = R.RUN_STATE_RUNNING  # the first stream had not known it yet
    b.run_state = R.RUN_STATE_RUNNING
    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=4)
    controller = _Breaking([snapshot, a, broken], [a_again, b, end])
    events = list(_follow(controller, "r1", _Patience("r1", 10, first=0.01)))
    assert [e.task.spec.name for e in events if e.HasField("task")] == ["a", "b"]


def test_task_events_after_a_resume_carry_the_run_state_the_follower_last_yielded():
    broken = UnavailableError("controller restarting", grpc.StatusCode.UNAVAILABLE)
    snapshot = controller_pb2.RunEvent(snapshot=t.Run(id="r1", state=R.RUN_STATE_PENDING))
    snapshot.revision, snapshot.run_state = 3, R.RUN_STATE_PENDING
    running = controller_pb2.RunEvent(run_state=R.RUN_STATE_RUNNING, revision=5)
    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=9)
    # One transaction at 5 made t1 READY and the run RUNNING; the stream broke after both.
    # The resume from 4 knows the run as PENDING (as of 4) until its run watch catches up,
    # behind its task watch: t2 (7) comes with PENDING.
    t1 = task_event("t1", 5)
    t1_again, t2_resumed = task_event("t1", 5), task_event("t2", 7)
    t1_again.run_state = t2_resumed.run_state = R.RUN_STATE_PENDING
    restated = controller_pb2.RunEvent(run_state=R.RUN_STATE_PENDING, revision=3)
    controller = _Breaking(
        [snapshot, t1, running, broken], [restated, t1_again, t2_resumed, running, end]
    )
    events = list(_follow(controller, "r1", _Patience("r1", 10, first=0.01)))
    assert controller.asked == [0, 4]
    assert [(e.task.spec.name or "run", e.run_state) for e in events[1:]] == [
        ("t1", R.RUN_STATE_PENDING),
        ("run", R.RUN_STATE_RUNNING),
        ("t2", R.RUN_STATE_RUNNING),
        ("run", R.RUN_STATE_SUCCEEDED),
    ]


def test_a_run_followed_from_its_last_revision_ends():
    async def main():
        watch = RunWatch()
        run = RunEntry("/p/runs/r1", t.Run(id="r1"), 0)
        run.msg.state, run.rev = R.RUN_STATE_SUCCEEDED, 9
        watch.written(run, run.msg.SerializeToString())
        return [ev async for ev in watch.watch(run, 9)]

    events = asyncio.run(main())
    # Not an empty stream, which a follower takes for one cut short and asks again for ever.
    assert [(e.run_state, e.revision) for e in events] == [(R.RUN_STATE_SUCCEEDED, 9)]


def test_not_yet_answers_are_asked_again_at_most_twice_a_second(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", pauses.append)
    patience = _Patience("r1", None)
    standby = UnavailableError("not the leader", grpc.StatusCode.UNAVAILABLE)
    standby.reason = "store_unavailable"
    for _ in range(20):
        patience.pause(standby)
    assert max(pauses) <= 0.5
    assert min(pauses[5:]) >= 0.25  # not reset to 0.1 s at every answer


def test_waits_last_read_keeps_within_its_timeout():
    class Done(_Breaking):
        def get_run(self, run_id, timeout=None):
            self.read_timeout = timeout
            return t.Run(id=run_id, state=R.RUN_STATE_SUCCEEDED)

    end = controller_pb2.RunEvent(run_state=R.RUN_STATE_SUCCEEDED, revision=3)
    controller = Done([end])
    assert RunHandle(controller, "r1").wait(timeout=5).state == R.RUN_STATE_SUCCEEDED
    assert 0 < controller.read_timeout <= 5


def test_the_client_pings_its_controllers_to_see_one_that_vanished(monkeypatch):
    seen = []
    real = grpc.insecure_channel
    monkeypatch.setattr(
        grpc, "insecure_channel", lambda a, options=None: seen.append(dict(options)) or real(a)
    )
    with Client("127.0.0.1:1"):
        pass
    # Within the controller's limit (a ping every 5 s at most), and not only twice.
    assert seen[0]["grpc.keepalive_time_ms"] >= 5000
    assert seen[0]["grpc.http2.max_pings_without_data"] == 0
