"""``work_retention`` on a real mesh: an agent removes a finished run's directory once it has
not changed for the retention, keeps the directory of a run whose attempt still runs however
old it is, and says why when asked for logs it removed."""

from __future__ import annotations

import pytest
from helpers import R, S, py

from tether.sdk import TetherError, Workflow

RETENTION = 0.6


def test_old_runs_are_removed_and_running_ones_kept(mesh):
    agent = mesh.add_agent("n1", work_retention=RETENTION)
    client = mesh.client()

    done = Workflow("short")
    done.task("hello", py("print('hi')"))
    done_run = client.submit(done)
    assert done_run.wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    assert [c.data for c in done_run.logs("hello") if c.data] == [b"hi\n"]

    long = Workflow("long")
    # Writes its output at the end, well past the retention: its directory must still be there.
    long.task(
        "slow",
        py(
            f"import json, os, time; time.sleep({4 * RETENTION}); "
            "open(os.environ['TETHER_OUTPUT_FILE'], 'w').write(json.dumps({'ok': 1}))"
        ),
    )
    long_run = client.submit(long)
    work = mesh.work_dir / "n1"
    mesh.wait_for(
        lambda: long_run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "long task running"
    )
    mesh.wait_for(lambda: not (work / done_run.id).exists(), 10, "finished run removed")
    assert (work / long_run.id).is_dir()

    final = long_run.wait(timeout=30)
    assert final.state == R.RUN_STATE_SUCCEEDED
    assert long_run.outputs() == {"slow": {"ok": 1}}
    mesh.wait_for(lambda: not (work / long_run.id).exists(), 10, "long run removed after")
    # The run's path is gone at its rename; the count follows the deletion in a thread.
    assert agent.cleaner is not None
    mesh.wait_for(lambda: agent.cleaner.removed >= 2, 10, "both deletions counted")
    assert (work / "node-id").exists()

    with pytest.raises(TetherError, match="work_retention"):
        list(done_run.logs("hello"))
