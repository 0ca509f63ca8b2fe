"""Masking secret values in text a task printed, before it is stored or shown.

Shared by the agent (on the log tails and message of each report it sends) and the
controller (again on every report it records: a restarted agent that adopted an attempt no
longer knows its task's secret values, and older agents may not mask at all).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["REDACTED", "redact_text"]

# What a secret's value becomes.
REDACTED = "[secret]"
# The shortest end of a value, cut by the start of a log tail, that is masked: shorter ones
# would mask ordinary text by chance more often than they hide anything.
_MIN_CUT = 4


def redact_text(text: str, values: Iterable[str]) -> str:
    """``text`` with each of ``values`` replaced by :data:`REDACTED`.

    ``text`` may be the tail of a log, whose start cuts a value in two: the end of a value
    that opens ``text`` (at least a few characters of it) is masked too.
    """
    ordered = sorted({v for v in values if v}, key=len, reverse=True)
    if not ordered or not text:
        return text
    for v in ordered:  # the longest first: a value may contain a shorter one
        text = text.replace(v, REDACTED)
    cut = 0
    for v in ordered:
        for k in range(min(len(v) - 1, len(text)), max(cut, _MIN_CUT - 1), -1):
            if text.startswith(v[-k:]):
                cut = k
                break
    return REDACTED + text[cut:] if cut else text
