"""A cancel asked while the agent is reconnecting still reaches the running attempt."""

from __future__ import annotations

import sys
import time

from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow

PY = sys.executable
S = t.TaskState
R = t.RunState


def test_cancel_requested_while_agent_reconnects_is_delivered(mesh):
    mesh.add_agent("n1")
    client = mesh.client()
    wf = Workflow("c")
    wf.task("long", [PY, "-c", "import time; time.sleep(30)"])
    run = client.submit(wf)
    mesh.wait_for(lambda: run.status().tasks[0].state == S.TASK_STATE_RUNNING, 10, "running")
    engine = mesh.controller.engine

    async def blip_and_cancel():
        engine.nodes["n1"].session.close()  # the agent's stream breaks...
        engine.cancel(run.id, "", "user")  # ...just as the user cancels

    mesh.call(blip_and_cancel())
    t0 = time.monotonic()
    deadline = t0 + 15
    while time.monotonic() < deadline:
        st = run.status()
        if st.state in (R.RUN_STATE_CANCELLED, R.RUN_STATE_FAILED, R.RUN_STATE_SUCCEEDED):
            break
        time.sleep(0.2)
    assert st.state == R.RUN_STATE_CANCELLED
