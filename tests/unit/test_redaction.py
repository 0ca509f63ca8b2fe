"""Masking secret values in report text (``sdk.redaction``)."""

from __future__ import annotations

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
