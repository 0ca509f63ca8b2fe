"""Tracing and logging set-up shared by the CLI, the controller and the agent.

Traces go over OTLP/gRPC when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; otherwise spans are created but not exported.
Each component gets its own :class:`TracerProvider`, so a test or ``tether dev`` can run a
controller and agents in one process and still see them as separate services.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "LOG_LEVELS",
    "SpanIds",
    "context_from_traceparent",
    "current_traceparent",
    "exports_spans",
    "fixed_span_ids",
    "get_logger",
    "make_tracer_provider",
    "parse_traceparent",
    "setup_logging",
    "traceparent_of",
]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


# Ids the next span started in this context must have (see fixed_span_ids).
_FIXED_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "tether_fixed_span_ids", default=None
)


class SpanIds(IdGenerator):
    """Random ids, except inside :func:`fixed_span_ids`, which sets the next span's ids.

    A run's span is recorded when the run ends, but its children were started long before
    (by other processes, perhaps other controllers) with its ids as their parent: those ids
    are chosen at submit and stored with the run, and this generator gives them back when
    the span is finally recorded.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[1] if fixed else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[0] if fixed else self._random.generate_trace_id()


@contextlib.contextmanager
def fixed_span_ids(trace_id: int, span_id: int) -> Iterator[None]:
    """Start spans inside this block with these ids (providers from make_tracer_provider).

    Start exactly one span inside it. A span with a parent takes the parent's trace id, so
    only a root span gets ``trace_id``.
    """
    token = _FIXED_IDS.set((trace_id, span_id))
    try:
        yield
    finally:
        _FIXED_IDS.reset(token)


def exports_spans() -> bool:
    """Whether spans leave this process (an OTLP endpoint is set): spans that are only
    leaves of a trace, and that nothing reads, can be skipped when they do not."""
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def make_tracer_provider(service_name: str) -> TracerProvider:
    """Return a provider for one component, exporting over OTLP/gRPC if an endpoint is set."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), id_generator=SpanIds()
    )
    if exports_spans():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def traceparent_of(span: trace.Span) -> str:
    """Return the W3C ``traceparent`` header value of a span ("" for an invalid one)."""
    # Formatted here, as the W3C propagator formats it, without the context it builds: this
    # runs for every attempt on agent and controller.
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def parse_traceparent(traceparent: str) -> trace.SpanContext | None:
    """The remote span context a ``traceparent`` names; None when it names none."""
    if not traceparent:
        return None
    m = _TRACEPARENT_00.fullmatch(traceparent)
    if m is None:  # another version, or not a traceparent: the propagator decides
        ctx = trace.get_current_span(context_from_traceparent(traceparent)).get_span_context()
        return ctx if ctx.is_valid else None
    # The common version-00 form, parsed without building a context.
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None
    return trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(int(m[3], 16))
    )


def current_traceparent() -> str:
    """Return the ``traceparent`` of the current span, or ``""``."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context | None:
    """Return a context whose parent is the given ``traceparent``, or None if empty."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def context_from_metadata(metadata: Mapping[str, str] | None) -> Context | None:
    """Extract W3C trace context from gRPC invocation metadata."""
    if not metadata:
        return None
    return _PROPAGATOR.extract(dict(metadata))


def _add_trace_ids(_logger, _name, event: dict) -> dict:
    span = trace.get_current_span()
    ctx = span.get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


# The levels --log-level / TETHER_LOG_LEVEL take.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def setup_logging(level: str = "info", json: bool | None = None, stream=None) -> None:
    """Configure structlog: JSON when not on a terminal (or when asked), readable otherwise.

    Args:
        level: Minimum level (debug, info, warning, error).
        json: Force JSON (True) or console (False) output; None decides by the terminal.
        stream: Where logs go; standard error by default.
    """
    stream = stream or sys.stderr
    if json is None:
        json = os.environ.get("TETHER_LOG_FORMAT", "").lower() == "json" or not stream.isatty()
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, stream=stream, format="%(message)s", force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
