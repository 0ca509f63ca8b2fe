"""The ready queue kept by priority level too (``Cache.levels``): tasks leave their level
with the queue, and one that comes back goes to the end of its level."""

from __future__ import annotations

from tether.api.v1 import types_pb2 as t
from tether.controller.cache import Cache
from tether.controller.records import RunEntry, TaskEntry


def _cache(priorities: dict[str, int | None]) -> tuple[Cache, RunEntry]:
    cache = Cache()
    run = RunEntry("k", t.Run(id="r"), 0)
    for name, prio in priorities.items():
        spec = t.TaskSpec(name=name, command=["true"])
        if prio is not None:
            spec.priority = prio
        run.tasks[name] = TaskEntry(name, t.TaskRun(run_id="r", spec=spec), 0)
    cache.add_run(run)
    return cache, run


def test_tasks_leave_their_level_with_the_queue_and_come_back_at_its_end():
    cache, run = _cache({"a": None, "b": 50, "c": 10, "d": 90})
    for name in "abcd":
        cache.enqueue(("r", name))
    assert {p: list(level) for p, level in cache.levels.items()} == {
        50: [("r", "a"), ("r", "b")],
        10: [("r", "c")],
        90: [("r", "d")],
    }
    cache.unready(("r", "a"), run.tasks["a"])
    cache.enqueue(("r", "a"))  # retried: behind b now
    assert list(cache.levels[50]) == [("r", "b"), ("r", "a")]
    for name in "abcd":
        cache.unready(("r", name), run.tasks[name])
    assert not cache.ready and all(not level for level in cache.levels.values())
