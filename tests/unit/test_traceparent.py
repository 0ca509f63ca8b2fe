"""traceparent parsing and formatting done by hand (per attempt) agree with the W3C propagator."""

import pytest
from opentelemetry import trace

from tether.sdk.telemetry import context_from_traceparent, parse_traceparent, traceparent_of

TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-00",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id: invalid
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id: invalid
        f"00-{TRACE}-{SPAN}-0g",
        f"00-{TRACE.upper()}-{SPAN}-01",  # the W3C form is lower-case
        f"00-{TRACE}-{SPAN}-+1",
        f"00-{TRACE}-{SPAN}- 1",
        f"00-{TRACE}-{SPAN}-01-",
        f"01-{TRACE}-{SPAN}-01-future",  # a later version may carry more fields
        f"ff-{TRACE}-{SPAN}-01",
        "",
        "garbage",
    ],
)
def test_parse_agrees_with_the_propagator(value):
    ours = parse_traceparent(value)
    theirs = trace.get_current_span(context_from_traceparent(value)).get_span_context()
    if not theirs.is_valid:
        assert ours is None
    else:
        assert ours is not None
        assert (ours.trace_id, ours.span_id, ours.trace_flags) == (
            theirs.trace_id,
            theirs.span_id,
            theirs.trace_flags,
        )


def test_format_round_trips_and_is_empty_for_an_invalid_span():
    value = f"00-{TRACE}-{SPAN}-01"
    assert traceparent_of(trace.NonRecordingSpan(parse_traceparent(value))) == value
    assert traceparent_of(trace.INVALID_SPAN) == ""


def test_an_empty_traceparent_names_no_span_even_inside_one():
    with trace.use_span(trace.NonRecordingSpan(parse_traceparent(f"00-{TRACE}-{SPAN}-01"))):
        assert parse_traceparent("") is None
