"""One etcd ``LeaseKeepAlive`` stream shared by every lease a controller renews.

Node records share a term's lease (:mod:`tether.controller.term_lease`), but a new leader
renews every lease it finds at takeover. Opening a bidirectional stream per renewal (what the
client library's ``keep_alive`` does) costs a stream setup and teardown on both sides each
time — for thousands of leases most of the controller's CPU. etcd answers keep-alive requests
on one stream in order, each answer naming its lease, so one long-lived stream carries them
all: a renewal is one small message each way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable

import grpc
from etcd3aio._protobuf import LeaseKeepAliveRequest, rpc_pb2

__all__ = ["LeaseStream"]

OpenCall = Callable[[AsyncIterator[LeaseKeepAliveRequest]], grpc.aio.StreamStreamCall]


class LeaseStream:
    """Renews leases over one shared stream, opened on first use and again after a failure.

    Args:
        open_call: Opens a ``LeaseKeepAlive`` call on the current etcd channel with the
            given request iterator.
    """

    def __init__(self, open_call: OpenCall) -> None:
        self._open_call = open_call
        self._waiters: defaultdict[int, deque[asyncio.Future[int]]] = defaultdict(deque)
        self._requests: asyncio.Queue[LeaseKeepAliveRequest | None] | None = None
        self._reader: asyncio.Task | None = None
        self._last_answer = 0.0  # loop time of the stream's last answer (or its opening)

    async def keepalive(self, lease_id: int, timeout: float) -> int:
        """Renew ``lease_id`` once; return its TTL, or 0 when it has expired.

        Raises:
            TimeoutError: no answer within ``timeout`` seconds.
            grpc.aio.AioRpcError: the stream failed (the next call opens a new one).
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[lease_id].append(fut)
        self._ensure_open().put_nowait(LeaseKeepAliveRequest(ID=lease_id))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            # A stream that answers nobody leads nowhere (a half-open connection, a member
            # cut off): drop it, so that the next renewal opens one on a live channel.
            if loop.time() - self._last_answer >= timeout and self._reader is not None:
                self._reader.cancel()
            raise
        finally:
            waiters = self._waiters.get(lease_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[lease_id]

    def _ensure_open(self) -> asyncio.Queue[LeaseKeepAliveRequest | None]:
        if self._requests is None or self._reader is None or self._reader.done():
            self._requests = asyncio.Queue()
            self._last_answer = asyncio.get_running_loop().time()
            self._reader = asyncio.create_task(self._read(self._requests), name="lease stream")
        return self._requests

    async def _read(self, requests: asyncio.Queue[LeaseKeepAliveRequest | None]) -> None:
        async def send() -> AsyncIterator[LeaseKeepAliveRequest]:
            while (req := await requests.get()) is not None:
                yield req

        call = self._open_call(send())
        error: BaseException | None = None
        try:
            async for resp in call:
                self._answer(resp)
            error = ConnectionError("etcd ended the lease keep-alive stream")
        except asyncio.CancelledError:
            error = ConnectionError("lease keep-alive stream closed")
            raise
        except Exception as e:
            error = e
        finally:
            call.cancel()
            if self._requests is requests:
                self._requests = None
            # Whoever waits on this stream learns it failed; their next call opens another.
            for waiters in self._waiters.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(error or ConnectionError("lease stream failed"))
            self._waiters.clear()

    def _answer(self, resp: rpc_pb2.LeaseKeepAliveResponse) -> None:
        self._last_answer = asyncio.get_running_loop().time()
        waiters = self._waiters.get(resp.ID)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(max(resp.TTL, 0))
                break
        if waiters is not None and not waiters:
            self._waiters.pop(resp.ID, None)

    async def close(self) -> None:
        """End the stream; waiting renewals fail."""
        if self._requests is not None:
            self._requests.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._reader = self._requests = None
