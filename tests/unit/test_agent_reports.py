"""What the agent puts on its stream for the runner's reports: a RUNNING report is held back
briefly, and dropped when the attempt's final report comes first."""

from __future__ import annotations

import asyncio
import time

from tether.agent import agent as agent_mod
from tether.agent.agent import Agent
from tether.agent.config import AgentConfig
from tether.api.v1 import agent_pb2
from tether.api.v1 import types_pb2 as t

S = t.TaskState


def status(task: str, state: int) -> agent_pb2.TaskStatus:
    ref = agent_pb2.AttemptRef(run_id="r", task=task, attempt=1)
    return agent_pb2.TaskStatus(ref=ref, state=state)


def sent_after(tmp_path, reports: list[agent_pb2.TaskStatus], wait: float) -> list[tuple]:
    async def go():
        agent = Agent(AgentConfig(node="n1", work_dir=tmp_path))
        outbox: asyncio.Queue = asyncio.Queue()
        agent._outbox = outbox
        for r in reports:
            agent._report(r)
        await asyncio.sleep(wait)
        out = []
        while not outbox.empty():
            s = outbox.get_nowait().status
            out.append((s.ref.task, s.state))
        agent.tracer_provider.shutdown()
        return out

    return asyncio.run(go())


def test_a_final_report_within_the_hold_replaces_the_running_one(tmp_path):
    sent = sent_after(
        tmp_path,
        [status("a", S.TASK_STATE_RUNNING), status("a", S.TASK_STATE_SUCCEEDED)],
        agent_mod.RUNNING_HOLD * 2,
    )
    assert sent == [("a", S.TASK_STATE_SUCCEEDED)]


def test_a_running_report_goes_out_after_the_hold(tmp_path):
    early = sent_after(tmp_path, [status("b", S.TASK_STATE_RUNNING)], 0)
    assert early == []
    later = sent_after(
        tmp_path,
        [status("b", S.TASK_STATE_RUNNING), status("c", S.TASK_STATE_FAILED)],
        agent_mod.RUNNING_HOLD * 2,
    )
    assert later == [("c", S.TASK_STATE_FAILED), ("b", S.TASK_STATE_RUNNING)]


def test_each_running_report_is_held_its_full_time_not_until_an_earlier_ones_timer(tmp_path):
    hold = agent_mod.RUNNING_HOLD

    async def go():
        agent = Agent(AgentConfig(node="n1", work_dir=tmp_path))
        outbox: asyncio.Queue = asyncio.Queue()
        agent._outbox = outbox

        def sent() -> list[str]:
            out = []
            while not outbox.empty():
                out.append(outbox.get_nowait().status.ref.task)
            return out

        for task in ("first", "second", "third"):
            agent._report(status(task, S.TASK_STATE_RUNNING))
        # Held for a while by hand rather than slept through: "first" is due, the others
        # have waited 40 % of the hold.
        now = time.monotonic()
        for key, (held, _) in list(agent._held.items()):
            agent._held[key] = (held, now - (1.2 if key[1] == "first" else 0.4) * hold)
        agent._held_timer.cancel()
        agent._send_held()
        at_first = sent()
        # The timer waits for the next oldest's turn only.
        left = agent._held_timer.when() - asyncio.get_running_loop().time()
        agent._report(status("third", S.TASK_STATE_SUCCEEDED))  # within its hold: replaces it
        agent._held_timer.cancel()
        for key, (held, _) in list(agent._held.items()):
            agent._held[key] = (held, now - 2 * hold)
        agent._send_held()
        at_second = sent()
        agent.tracer_provider.shutdown()
        return at_first, left, at_second, agent._held, agent._held_timer

    at_first, left, at_second, still_held, timer = asyncio.run(go())
    assert at_first == ["first"]
    assert 0.5 * hold < left <= 0.61 * hold
    assert at_second == ["third", "second"]  # the final report, then the RUNNING one when due
    assert still_held == {} and timer is None
