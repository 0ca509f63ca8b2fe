"""The one check point of every client call: token, rate, role, then the audit line.

A gRPC server interceptor wraps each method's handler, so the check runs inside the call
(with its context, able to abort it) and the handler sees the caller through
:func:`tether.controller.auth.current_principal`.
"""

from __future__ import annotations

import time

import grpc

from tether.controller.auth import (
    AGENT_SERVICE,
    ANONYMOUS,
    MUTATING,
    Principal,
    Role,
    TokenBucket,
    is_open,
    required_role,
    reset_principal,
    set_principal,
)
from tether.controller.errors import PermissionDenied, RateLimited, Unauthenticated, abort_for
from tether.controller.handler_cache import HandlerCache
from tether.controller.tokens import TokenStore
from tether.sdk.telemetry import get_logger

__all__ = ["Guard"]

log = get_logger("controller.audit")
_BEARER = "bearer "
# How often an open stream's token is checked again (on the stream's next message): a
# user's, and an agent's (one etcd read each; a mesh may hold thousands of agent streams).
RECHECK_SECONDS = 1.0
AGENT_RECHECK_SECONDS = 30.0


class Guard(grpc.aio.ServerInterceptor):
    """Authenticates, rate-limits and authorizes calls, and audits the mutating ones.

    Args:
        tokens: Where tokens are looked up.
        enabled: Whether tokens are checked; when off everyone is an unnamed admin, and
            mutating calls are still audited.
        rate: Requests a second each token may make on average (0: unlimited).
        burst: Requests a token may make at once.
        agents_need_token: Agents' streams need a token too (role :data:`AGENT_ROLE`):
            tokens are checked and no node certificates are, so nothing else says who an
            agent is.
    """

    def __init__(
        self,
        tokens: TokenStore,
        enabled: bool,
        rate: float,
        burst: float,
        agents_need_token: bool = False,
    ) -> None:
        self.tokens = tokens
        self.enabled = enabled
        self.agents_need_token = enabled and agents_need_token
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._handlers = HandlerCache()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method not in MUTATING and (not self.enabled or self._open(method)):
            return handler
        return self._handlers.get(method, handler, lambda h: _wrap(h, method, self))

    async def admit(self, method: str, metadata) -> Principal:
        """The caller, if it may call ``method`` now; raises the refusal otherwise."""
        if not self.enabled:
            return ANONYMOUS
        if self._open(method):
            return Principal("anonymous", Role.VIEWER, authenticated=False)
        need = required_role(method)
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if not header:
            raise Unauthenticated(
                f"no token: {_short(method)} needs role {need.label}; "
                "pass --token or set TETHER_TOKEN"
            )
        if not isinstance(header, str) or not header.lower().startswith(_BEARER):
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        principal = await self.tokens.authenticate(header[len(_BEARER) :].strip())
        try:
            self._limit(principal)
            if not principal.may(need):
                raise PermissionDenied(
                    f"{_short(method)} needs role {need.label}; token {principal.name!r} "
                    f"has role {principal.role.label}"
                )
        except (PermissionDenied, RateLimited) as e:
            e.principal = principal  # for the audit line: who was refused
            raise
        return principal

    async def still_valid(self, principal: Principal, metadata) -> None:
        """For a stream open for a while: raise Unauthenticated if the token it was opened
        with has been revoked or has expired since (no rate is charged)."""
        if not principal.authenticated:
            return
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        await self.tokens.authenticate(str(header)[len(_BEARER) :].strip())

    def _open(self, method: str) -> bool:
        if self.agents_need_token and method.startswith(AGENT_SERVICE):
            return False
        return is_open(method)

    def _limit(self, principal: Principal) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            bucket = self._buckets[principal.name] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        if wait:
            raise RateLimited(
                f"rate limit of token {principal.name!r} exceeded "
                f"({self.rate:g}/s, burst {self.burst:g}); retry in {wait:.2f}s",
                wait,
            )

    def audit(self, method: str, principal: Principal | None, run_id: str, code) -> None:
        """One structured line per mutating call, refused ones included."""
        if method not in MUTATING:
            return
        log.info(
            "audit",
            who=principal.name if principal else "unknown",
            # No role for callers without a token (bootstrap, or auth off): they proved nothing.
            role=principal.role.label if principal and principal.authenticated else "",
            method=_short(method),
            run_id=run_id,
            result=(code or grpc.StatusCode.OK).name,
        )


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _run_id(request, response=None) -> str:
    return getattr(response, "run_id", "") or getattr(request, "run_id", "")


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Guard) -> grpc.RpcMethodHandler:
    """``handler`` with the guard's check before it and the audit line after it."""

    async def enter(request, context) -> Principal:
        try:
            return await guard.admit(method, context.invocation_metadata())
        except Exception as e:  # refused (or etcd unreachable): the one mapping decides
            try:
                await abort_for(context, e)
            finally:
                who = getattr(e, "principal", None)
                guard.audit(method, who, _run_id(request), context.code())

    async def unary_unary(request, context):
        principal = await enter(request, context)
        token = set_principal(principal)
        response = None
        try:
            response = await handler.unary_unary(request, context)
            return response
        finally:
            guard.audit(method, principal, _run_id(request, response), context.code())
            reset_principal(token)

    every = AGENT_RECHECK_SECONDS if method.startswith(AGENT_SERVICE) else RECHECK_SECONDS

    async def checked(items, principal: Principal, context):
        # A stream outlives the check at its start (`logs -f`, `watch`, an agent's): its
        # token is checked again before it sends anything once `every` seconds have
        # passed, so that a revoked or expired token stops reading within that time.
        due = time.monotonic() + every
        async for item in items:
            if principal.authenticated and time.monotonic() >= due:
                try:
                    await guard.still_valid(principal, context.invocation_metadata())
                except Exception as e:
                    await abort_for(context, e)
                due = time.monotonic() + every
            yield item

    async def unary_stream(request, context):
        principal = await enter(request, context)
        token = set_principal(principal)
        try:
            items = handler.unary_stream(request, context)
            async for item in checked(items, principal, context):
                yield item
        finally:
            reset_principal(token)

    async def stream_unary(request_iterator, context):
        principal = await enter(None, context)
        token = set_principal(principal)
        try:
            return await handler.stream_unary(request_iterator, context)
        finally:
            reset_principal(token)

    async def stream_stream(request_iterator, context):
        principal = await enter(None, context)
        token = set_principal(principal)
        try:
            items = handler.stream_stream(request_iterator, context)
            async for item in checked(items, principal, context):
                yield item
        finally:
            reset_principal(token)

    kinds = {
        "unary_unary": (unary_unary, grpc.unary_unary_rpc_method_handler),
        "unary_stream": (unary_stream, grpc.unary_stream_rpc_method_handler),
        "stream_unary": (stream_unary, grpc.stream_unary_rpc_method_handler),
        "stream_stream": (stream_stream, grpc.stream_stream_rpc_method_handler),
    }
    for kind, (behavior, make) in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
