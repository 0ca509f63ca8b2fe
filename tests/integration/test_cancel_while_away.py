"""A cancel asked while the agent is reconnecting still reaches the running attempt."""

from __future__ import annotations

from helpers import PY, R, S

from tether.sdk import Workflow


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
        await engine.cancel(run.id, "", "user")  # ...just as the user cancels

    mesh.call(blip_and_cancel())
    st = run.wait(timeout=15)
    assert st.state == R.RUN_STATE_CANCELLED
