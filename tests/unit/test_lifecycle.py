"""The lifecycle tables: every allowed move works, every other move is refused."""

import itertools

import pytest

from tether.api.v1 import types_pb2 as t
from tether.controller import lifecycle as lc

ALL_TASK = [s for s in t.TaskState.values() if s != 0]
ALL_RUN = [s for s in t.RunState.values() if s != 0]


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(ALL_TASK, ALL_TASK)))
def test_task_moves(src, dst):
    task = t.TaskRun(state=src, spec=t.TaskSpec(name="x"))
    if dst in lc.TASK_TRANSITIONS[src]:
        lc.move_task(task, dst)
        assert task.state == dst
    else:
        with pytest.raises(lc.IllegalTransition):
            lc.move_task(task, dst)
        assert task.state == src


def test_terminal_states_have_no_way_out():
    for s in lc.TASK_TERMINAL:
        assert not lc.TASK_TRANSITIONS[s]
    for s in lc.RUN_TERMINAL:
        assert not lc.RUN_TRANSITIONS[s]


def test_expected_paths_exist():
    path = [
        lc.PENDING,
        lc.READY,
        lc.SCHEDULED,
        lc.RUNNING,
        lc.RETRYING,
        lc.READY,
        lc.SCHEDULED,
        lc.LOST,
        lc.READY,
        lc.SCHEDULED,
        lc.RUNNING,
        lc.SUCCEEDED,
    ]
    task = t.TaskRun(state=path[0])
    for s in path[1:]:
        lc.move_task(task, s)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(ALL_RUN, ALL_RUN)))
def test_run_moves(src, dst):
    run = t.Run(state=src)
    if dst in lc.RUN_TRANSITIONS[src]:
        lc.move_run(run, dst)
        assert run.state == dst
    else:
        with pytest.raises(lc.IllegalTransition):
            lc.move_run(run, dst)


def test_a_task_leaving_the_queue_drops_its_reason_to_wait():
    for dst in lc.TASK_TRANSITIONS[lc.READY]:
        task = t.TaskRun(state=lc.READY, spec=t.TaskSpec(name="x"), waiting_reason="needs 2 GPUs")
        lc.move_task(task, dst)
        assert task.waiting_reason == "", lc.task_state_name(dst)
    # Back in the queue (a retry), the next pass says why it waits, if it does.
    task = t.TaskRun(state=lc.LOST, spec=t.TaskSpec(name="x"), waiting_reason="kept")
    lc.move_task(task, lc.READY)
    assert task.waiting_reason == "kept"
