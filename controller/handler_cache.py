"""Interceptors' wrapped method handlers, kept per method.

gRPC asks every server interceptor for the handler of each call, and the handler it gets from
further in is the same object every time: wrapping it again per call (new closures and handler
objects in three interceptors) was a tenth of a small submit's time in the controller.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

__all__ = ["HandlerCache"]


class HandlerCache:
    """The wrapped handler of each method, rebuilt only if the inner handler changes."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        wrap: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        """``wrap(handler)``, made once per method and inner handler."""
        hit = self._by_method.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap(handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped
