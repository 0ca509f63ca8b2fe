"""What `tether status` prints for a run: each task's detail, the run's message, and task
text shown as it is (brackets in it are not rich markup)."""

from __future__ import annotations

import io

from rich.console import Console

from tether.api.v1 import types_pb2 as t
from tether.sdk.terminal import print_failures, task_table

S = t.TaskState


def render(*renderables) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    for r in renderables:
        console.print(r)
    return out.getvalue()


def test_a_cancelled_task_shows_why_and_the_run_its_message():
    run = t.Run(id="r1", workflow_name="wf", state=t.RunState.RUN_STATE_CANCELLED)
    run.message = "run timed out after 3s"
    queued = run.tasks.add(state=S.TASK_STATE_CANCELLED, message="run timed out after 3s")
    queued.spec.name = "train"
    # As a controller before this change left it on tasks cancelled in the queue.
    queued.waiting_reason = "needs 2 GPUs; the best node has 0"
    waiting = run.tasks.add(index=1, state=S.TASK_STATE_READY, waiting_reason="needs 1 GPU")
    waiting.spec.name = "score"
    text = render(task_table(run))
    assert "needs 2 GPUs" not in text
    assert text.count("run timed out after 3s") == 2  # the task's detail and the run's caption
    assert "needs 1 GPU" in text


def test_brackets_in_messages_are_printed_not_taken_for_markup():
    run = t.Run(id="r1", workflow_name="wf", state=t.RunState.RUN_STATE_FAILED)
    run.message = "1 task failed [/x]"
    failed = run.tasks.add(state=S.TASK_STATE_FAILED, message="bad [/oops] input [bold]x")
    failed.spec.name = "parse"
    out = io.StringIO()
    print_failures(run, Console(file=out, width=200, color_system=None))
    text = render(task_table(run, wide=True)) + out.getvalue()
    assert text.count("bad [/oops] input [bold]x") == 2 and "1 task failed [/x]" in text
