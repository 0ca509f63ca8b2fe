"""Masking secret values in report text (``sdk.redaction``)."""

from __future__ import annotations

from tether.agent import launch
from tether.api.v1 import agent_pb2
from tether.sdk.redaction import REDACTED, redact_text


def test_every_occurrence_is_masked_the_longest_value_first():
    text = "a=hunter2 b=hunter2-long c=hunter2"
    assert redact_text(text, ["hunter2", "hunter2-long", ""]) == (
        f"a={REDACTED} b={REDACTED} c={REDACTED}"
    )


def test_a_value_cut_by_the_start_of_a_tail_is_masked():
    secret = "sk-live-0123456789abcdef"
    assert redact_text(secret[-10:] + "\nnext line", [secret]) == f"{REDACTED}\nnext line"
    # The longest cut end wins when several values could have been cut.
    assert redact_text("6789abcdef rest", ["zzzz6789abcdef", "xxcdef"]) == f"{REDACTED} rest"


def test_a_few_characters_that_merely_match_a_values_end_are_left():
    assert redact_text("def main():", ["abcdef"]) == "def main():"
    assert redact_text("nothing here", ["abcdef"]) == "nothing here"
    assert redact_text("", ["abcdef"]) == ""
    assert redact_text("text", []) == "text"


def test_secret_cut_by_the_tail_window_is_still_masked(tmp_path):
    secret = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
    keep = 30  # characters of the secret that fall inside the tail window
    log = tmp_path / "stdout.log"
    filler = "x" * (launch.TAIL_BYTES - keep - 1)
    log.write_text("API key: " + secret + "\n" + filler)
    status = agent_pb2.TaskStatus(stdout_tail=launch.tail(log))
    launch.redact(status, [secret])
    leaked = secret[-keep:]
    assert leaked not in status.stdout_tail, (
        f"{keep} of the secret's {len(secret)} characters are in the stored tail: "
        f"{status.stdout_tail[: keep + 5]!r}..."
    )
