"""RPC counts and latencies by method and status code: a server interceptor.

It is the outermost interceptor, so refusals by the others (malformed requests, auth, rate
limits) are counted with their codes too. A stream is timed over its whole life.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from tether.controller.handler_cache import HandlerCache
from tether.controller.malformed import drain
from tether.controller.metrics import Metrics

__all__ = ["GrpcMetrics"]


def _split(method: str) -> tuple[str, str]:
    """``/tether.v1.ControllerService/GetRun`` → (``tether.v1.ControllerService``, ``GetRun``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


def _code_of(context, error: BaseException | None) -> str:
    """The status an RPC ended with: what the handler set or aborted with, else from how it
    ended (no error: OK; cancelled: CANCELLED; another exception: UNKNOWN)."""
    code = None
    try:
        code = context.code()
    except Exception:  # not every context type answers code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # the C core's numeric code
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if error is None:
        return grpc.StatusCode.OK.name
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


class _Call:
    """One RPC being measured."""

    def __init__(self, metrics: Metrics, method: str, kind: str) -> None:
        self.metrics = metrics
        self.service, self.method = _split(method)
        self.kind = kind
        self.start = time.perf_counter()
        metrics.grpc_started.labels(self.service, self.method, kind).inc()

    def done(self, context, error: BaseException | None) -> None:
        labels = (self.service, self.method, self.kind, _code_of(context, error))
        self.metrics.grpc_handled.labels(*labels).inc()
        self.metrics.grpc_latency.labels(*labels).observe(time.perf_counter() - self.start)


def _wrap(metrics: Metrics, handler: grpc.RpcMethodHandler, method: str):
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            call, error = _Call(metrics, method, "unary"), None
            try:
                return await inner(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                call.done(context, error)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            call, error = _Call(metrics, method, "server_stream"), None
            try:
                async for item in drain(inner_us(request, context)):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                call.done(context, error)

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            call, error = _Call(metrics, method, "client_stream"), None
            try:
                return await inner_su(requests, context)
            except BaseException as e:
                error = e
                raise
            finally:
                call.done(context, error)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    inner_ss = handler.stream_stream

    async def stream_stream(requests, context):
        call, error = _Call(metrics, method, "bidi_stream"), None
        try:
            async for item in drain(inner_ss(requests, context)):
                yield item
        except BaseException as e:
            error = e
            raise
        finally:
            call.done(context, error)

    return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every RPC into ``metrics`` (``grpc_server_started_total``,
    ``grpc_server_handled_total``, ``grpc_server_handling_seconds``), labelled by service,
    method, type and (once it ends) status code."""

    def __init__(self, metrics: Metrics) -> None:
        self._handlers = HandlerCache()
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return self._handlers.get(method, handler, lambda h: _wrap(self.metrics, h, method))
