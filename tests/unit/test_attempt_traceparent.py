"""The task's TRACEPARENT when the agent exports no spans: a new span id in the run's trace."""

from __future__ import annotations

import re

from tether.agent.runner import _child_of

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FORM = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def test_a_child_keeps_the_trace_and_its_flags_with_a_new_span_id_each_time():
    seen = set()
    for parent, flags in ((TP, "01"), (TP[:-2] + "00", "00")):
        for _ in range(3):
            m = FORM.fullmatch(_child_of(parent))
            assert m is not None
            assert m[1] == "0af7651916cd43dd8448eb211c80319c"
            assert m[3] == flags
            assert m[2] not in ("b7ad6b7169203331", "0" * 16)
            seen.add(m[2])
    assert len(seen) == 6


def test_without_a_valid_parent_each_attempt_starts_a_sampled_trace_of_its_own():
    for parent in ("", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01"):
        a, b = FORM.fullmatch(_child_of(parent)), FORM.fullmatch(_child_of(parent))
        assert a is not None and b is not None
        assert a[1] != b[1] and a[1] != "0" * 32
        assert a[3] == "01"
