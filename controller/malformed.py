"""Malformed request messages (garbage bytes, a truncated message, invalid UTF-8 in a string
field) become ``INVALID_ARGUMENT``.

Left to gRPC, a message that fails to parse raises in the server's deserializer: the client
gets ``UNKNOWN`` and the log a traceback. This interceptor makes every method's deserializer
return a marker instead, and the method then refuses the request (for a stream, the message)
before any handler sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

from tether.controller.handler_cache import HandlerCache
from tether.sdk.errors import ERROR_REASON_KEY
from tether.sdk.telemetry import get_logger

__all__ = ["MalformedRequests", "drain"]

log = get_logger("controller.malformed")


class _Malformed:
    """Stands in for a request that did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or whatever a parser raises
            return _Malformed(e)

    return parse


async def _refuse(context, method: str, bad: _Malformed) -> None:
    log.warning("malformed request refused", method=method, error=str(bad.error)[:200])
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"malformed request to {method}: not a valid protobuf message (truncated, garbage, "
        "or a string that is not UTF-8)",
        trailing_metadata=((ERROR_REASON_KEY, "invalid_argument"),),
    )


def _checked_stream(method: str, requests, context):
    async def stream():
        async for request in requests:
            if isinstance(request, _Malformed):
                await _refuse(context, method, request)
            yield request

    return stream()


async def drain(result):
    """Yield what a streaming handler produces, whether it yields or writes to its context."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    else:
        for item in result:
            yield item


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    des = _lenient(handler.request_deserializer)
    ser = handler.response_serializer
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await _refuse(context, method, request)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, _Malformed):
                await _refuse(context, method, request)
            async for item in drain(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            return await inner_su(_checked_stream(method, requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    inner_ss = handler.stream_stream

    async def stream_stream(requests, context):
        async for item in drain(inner_ss(_checked_stream(method, requests, context), context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Refuse requests that do not parse with ``INVALID_ARGUMENT``, without a traceback."""

    def __init__(self) -> None:
        self._handlers = HandlerCache()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return self._handlers.get(method, handler, lambda h: _wrap(h, method))
