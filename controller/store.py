"""Tether's small window onto etcd: keys, typed records, transactions, leases, watches.

Everything the controller persists goes through this module, so the etcd client library
(etcd3aio) can be swapped without touching the engine. Values are serialized protobuf.

Key layout under the configured prefix ``P``::

    P/nodes/<node>          Node     (bound to the node lease of the term it registered in)
    P/node-grace/<node>     Duration (its agent's disconnect grace, where longer than a lease
                                      TTL: kept past the record, for the next leader)
    P/runs/<run>            Run      (no tasks inside: they are keys of their own)
    P/tasks/<run>/<task>    TaskRun
    P/deps/<run>/<task>/<n> DependsOnPart (a long depends_on list, written once)
    P/requests/<sha256>     run id   (idempotent submit)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from etcd3aio import Etcd3Client, EtcdError, SortOrder, prefix_range_end
from etcd3aio._protobuf import Compare, RequestOp, rpc_pb2
from etcd3aio.errors import EtcdPermissionDeniedError, EtcdUnauthenticatedError

from tether.controller.errors import StoreUnavailable
from tether.controller.etcd_connection import EtcdConnection, parse_endpoints
from tether.controller.lease_stream import LeaseStream

__all__ = ["Delete", "Event", "KeyValue", "Keys", "Put", "Store"]

# etcd refuses a transaction with more than 128 operations (--max-txn-ops) and a request
# above 1.5 MiB (--max-request-bytes); stay well inside both. Small requests also keep the
# raft log and the leader's lease renewals moving while a big run is written.
MAX_TXN_OPS = 120
MAX_TXN_BYTES = 192 * 1024
_RANGE_PAGE = 1000


class Keys:
    """The key layout under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes = f"{prefix}/nodes/"
        self.node_controls = f"{prefix}/node-control/"
        self.node_graces = f"{prefix}/node-grace/"
        self.runs = f"{prefix}/runs/"
        self.tasks = f"{prefix}/tasks/"
        self.requests = f"{prefix}/requests/"
        self.deps = f"{prefix}/deps/"
        self.leader = f"{prefix}/leader"

    def node(self, name: str) -> str:
        return self.nodes + name

    def node_control(self, name: str) -> str:
        return self.node_controls + name

    def node_grace(self, name: str) -> str:
        return self.node_graces + name

    def run(self, run_id: str) -> str:
        return self.runs + run_id

    def tasks_of(self, run_id: str) -> str:
        return f"{self.tasks}{run_id}/"

    def task(self, run_id: str, task: str) -> str:
        return f"{self.tasks}{run_id}/{task}"

    def deps_of(self, run_id: str) -> str:
        return f"{self.deps}{run_id}/"

    def depends_on_of(self, run_id: str, task: str) -> str:
        return f"{self.deps}{run_id}/{task}/"

    def depends_on_part(self, run_id: str, task: str, part: int) -> str:
        return f"{self.deps}{run_id}/{task}/{part:06d}"

    def request(self, request_id: str) -> str:
        return self.requests + hashlib.sha256(request_id.encode()).hexdigest()


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    create_revision: int = 0


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Event:
    """One watched change. ``value`` is empty for a delete."""

    key: str
    value: bytes
    revision: int
    deleted: bool
    prev_value: bytes = b""
    prev_lease: int = 0


_MOD = Compare.CompareTarget.MOD


def mod_revision_is(key: str, revision: int) -> Compare:
    """Compare that holds when the key's mod_revision equals ``revision`` (0: key absent)."""
    return Compare(
        key=key.encode(),
        target=Compare.CompareTarget.MOD,
        result=Compare.CompareResult.EQUAL,
        mod_revision=revision,
    )


def _compacted(e: grpc.aio.AioRpcError) -> bool:
    """Whether etcd refused a request because the revision it names was compacted."""
    return e.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (e.details() or "")


def _op(op: Put | Delete) -> RequestOp:
    if isinstance(op, Put):
        return RequestOp(
            request_put=rpc_pb2.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    end = prefix_range_end(op.key.encode()) if op.prefix else b""
    return RequestOp(
        request_delete_range=rpc_pb2.DeleteRangeRequest(key=op.key.encode(), range_end=end)
    )


class Store:
    """Async access to etcd under one key prefix.

    Args:
        endpoints: etcd members (``host:port`` or URLs), or a whole :class:`EtcdConnection`
            with TLS and user.
        prefix: Key prefix for every record.
        timeout: Deadline of each etcd call, seconds.
    """

    def __init__(
        self, endpoints: Sequence[str] | EtcdConnection, prefix: str, timeout: float = 5.0
    ) -> None:
        self.keys = Keys(prefix)
        if not isinstance(endpoints, EtcdConnection):
            endpoints = EtcdConnection(parse_endpoints(endpoints))
        self.connection = endpoints
        self._client = Etcd3Client([e.address for e in endpoints.endpoints], rpc_max_attempts=3)
        # etcd3aio dials IP literals only; this one also takes names, IPv6 and TLS settings.
        self._client._manager = endpoints.channel_manager()
        self._token_refresher = None
        self._timeout = timeout
        self.txn_count = 0
        self.put_count = 0
        self.max_request_bytes = 0
        # Set while this controller leads: a compare added to every write transaction.
        self.fence: Compare | None = None
        self._leases = LeaseStream(self._open_keepalive)
        # Told of every etcd request: (operation, seconds, failed). Metrics set it.
        self.observe: Callable[[str, float, bool], None] = lambda *_: None

    @contextlib.asynccontextmanager
    async def _request(self, operation: str) -> AsyncIterator[None]:
        """Time one etcd request for :attr:`observe` (the one place every call goes through)."""
        start = time.perf_counter()
        failed = False
        try:
            yield
        except asyncio.CancelledError:
            raise
        except Exception:
            failed = True
            raise
        finally:
            self.observe(operation, time.perf_counter() - start, failed)

    async def connect(self) -> None:
        try:
            await self._client.connect()
        except ValueError as e:  # an unreadable TLS file
            raise StoreUnavailable(str(e)) from None

    async def close(self) -> None:
        if self._token_refresher is not None:
            await self._token_refresher.__aexit__(None, None, None)
            self._token_refresher = None
        await self._leases.close()
        await self._client.close()

    async def wait_ready(self, deadline: float = 15.0) -> None:
        """Wait until etcd answers (logging in first when a user is configured), or raise
        StoreUnavailable; a refused user or password fails at once."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        conn = self.connection
        while True:
            try:
                if conn.user and self._token_refresher is None:
                    await self._log_in()
                await self._client.kv.get(self.keys.prefix, timeout=1.0, max_attempts=1)
                return
            except (EtcdUnauthenticatedError, EtcdPermissionDeniedError, grpc.aio.AioRpcError) as e:
                # etcd answers a wrong password or a missing user with INVALID_ARGUMENT.
                rpc = isinstance(e, grpc.aio.AioRpcError)
                if rpc and e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                detail = e.details() if rpc else str(e)
                who = f"user {conn.user!r}" if conn.user else "no user (give --etcd-user)"
                raise StoreUnavailable(f"etcd refused {who}: {detail}") from None
            except (EtcdError, TimeoutError) as e:
                if loop.time() > end:
                    raise StoreUnavailable(f"etcd not reachable at {conn.describe()}: {e}") from e
                await asyncio.sleep(0.2)

    async def _log_in(self) -> None:
        try:
            password = self.connection.password()
        except ValueError as e:
            raise StoreUnavailable(str(e)) from None
        # etcd's simple tokens expire after 5 minutes and die with an etcd restart; a short
        # refresh interval bounds how long a restarted etcd refuses this controller.
        refresher = self._client.token_refresher(self.connection.user, password, interval=30.0)
        await asyncio.wait_for(refresher.__aenter__(), 2.0)
        self._token_refresher = refresher

    async def revision(self) -> int:
        """etcd's current revision (read with one small range request)."""
        return (await self.read(self.keys.prefix))[1]

    async def compact(self, revision: int) -> bool:
        """Compact etcd's history up to ``revision``; False when it was compacted that far
        already (by etcd itself, say)."""
        try:
            async with self._request("compact"):
                await self._client.kv.compact(revision, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            if _compacted(e):
                return False
            raise
        return True

    async def read(self, key: str) -> tuple[KeyValue | None, int]:
        """``key``'s value and the revision it was read at (to watch from, after it)."""
        async with self._request("get"):
            resp = await self._client.kv.get(key, timeout=self._timeout)
        if not resp.kvs:
            return None, resp.header.revision
        kv = resp.kvs[0]
        value = KeyValue(kv.key.decode(), kv.value, kv.mod_revision, kv.lease, kv.create_revision)
        return value, resp.header.revision

    async def get(self, key: str) -> KeyValue | None:
        return (await self.read(key))[0]

    async def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        start: str | None = None,
        newest_first: bool = False,
        revision: int = 0,
        min_mod_revision: int = 0,
    ) -> tuple[list[KeyValue], int]:
        """Return the keys under ``prefix`` (paged internally) and the read's revision.

        ``start`` continues after a key: for ascending order, keys > start; for
        ``newest_first`` (descending by key), keys < start. ``min_mod_revision``: only keys
        last changed at or after it (filtered by etcd, which still scans the whole range).
        """
        out: list[KeyValue] = []
        header_rev = revision
        async for page, rev in self.pages(
            prefix,
            limit=limit,
            start=start,
            newest_first=newest_first,
            revision=revision,
            min_mod_revision=min_mod_revision,
        ):
            out.extend(page)
            header_rev = rev
        return out, header_rev

    async def pages(
        self,
        prefix: str,
        *,
        limit: int = 0,
        start: str | None = None,
        newest_first: bool = False,
        revision: int = 0,
        min_mod_revision: int = 0,
    ) -> AsyncIterator[tuple[list[KeyValue], int]]:
        """:meth:`range` a page at a time, each with the read's revision (all at one): for
        callers that consume the keys as they come rather than hold all of a big run's."""
        end = prefix_range_end(prefix.encode())
        lo: bytes = prefix.encode()
        hi: bytes = end
        if start is not None:
            if newest_first:
                hi = start.encode()
            else:
                lo = start.encode() + b"\x00"
        header_rev = revision
        got = 0
        while True:
            want = _RANGE_PAGE if not limit else min(_RANGE_PAGE, limit - got)
            order = SortOrder.DESCEND if newest_first else SortOrder.ASCEND
            try:
                async with self._request("range"):
                    resp = await self._range(lo, hi, want, header_rev, order, min_mod_revision)
            except grpc.aio.AioRpcError as e:
                if _compacted(e):  # a read at a revision etcd no longer has
                    from tether.controller.errors import OutOfRange

                    raise OutOfRange(f"revision {header_rev} was compacted") from None
                raise
            header_rev = header_rev or resp.header.revision
            page = [
                KeyValue(kv.key.decode(), kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs
            ]
            got += len(page)
            yield page, header_rev
            if not resp.more or not resp.kvs or (limit and got >= limit):
                return
            last = resp.kvs[-1].key
            if newest_first:
                hi = last
            else:
                lo = last + b"\x00"

    async def _range(
        self, lo: bytes, hi: bytes, limit: int, revision: int, order: SortOrder, min_mod: int
    ) -> rpc_pb2.RangeResponse:
        kv = self._client.kv
        if not min_mod:
            return await kv.get(
                lo,
                range_end=hi,
                limit=limit,
                revision=revision,
                timeout=self._timeout,
                sort_order=order,
            )
        # The library's get() has no min_mod_revision: the request is built here.
        request = rpc_pb2.RangeRequest(
            key=lo,
            range_end=hi,
            limit=limit,
            revision=revision,
            sort_order=int(order),
            min_mod_revision=min_mod,
        )
        return await kv._rpc(kv._stub.Range, request, operation="KV.Range", timeout=self._timeout)

    async def _check_fence(self) -> None:
        """After a failed fenced transaction: raise NotLeader if the fence is what failed."""
        fence = self.fence
        if fence is None:
            return
        kv = await self.get(self.keys.leader)
        if kv is None or kv.create_revision != fence.create_revision:
            from tether.controller.errors import NotLeader

            raise NotLeader("this controller is no longer the leader")

    async def txn(
        self,
        compares: Sequence[Compare],
        ops: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
        fenced: bool = True,
    ) -> tuple[bool, int]:
        """Run one transaction; return (succeeded, revision after it).

        While this controller leads, the transaction also requires the leader key to be ours.

        Raises:
            NotLeader: the transaction failed because this controller lost leadership.
        """
        if fenced and self.fence is not None:
            compares = [self.fence, *compares]
        request_ops = [_op(o) for o in ops]
        size = sum(len(o.value) + len(o.key) for o in ops if isinstance(o, Put))
        self.max_request_bytes = max(self.max_request_bytes, size)
        self.txn_count += 1
        self.put_count += sum(1 for o in ops if isinstance(o, Put))
        async with self._request("txn"):
            resp = await self._client.kv.txn(
                compares, request_ops, [_op(o) for o in failure], timeout=self._timeout
            )
        if not resp.succeeded and fenced:
            await self._check_fence()
        return resp.succeeded, resp.header.revision

    async def create(
        self, items: Sequence[tuple[str, bytes]], guard: Compare | None = None
    ) -> tuple[bool, int]:
        """Create every key of ``items`` (key, value) in one transaction, which fails if any
        exists (or ``guard`` does not hold); return (succeeded, revision after it). Fenced
        like :meth:`txn`.

        The same as ``txn`` with a ``mod_revision_is(key, 0)`` and a ``Put`` per key, built
        straight into one request: a big submit writes 100,000 keys this way, and building
        three messages per key (then copying them into the request) was most of its time.
        """
        request = rpc_pb2.TxnRequest()
        compare, success = request.compare.add, request.success.add
        if self.fence is not None:
            request.compare.append(self.fence)
        if guard is not None:
            request.compare.append(guard)
        size = 0
        for key, value in items:
            k = key.encode()
            compare(key=k, target=_MOD)  # result EQUAL and mod_revision 0 are the defaults
            put = success().request_put
            put.key = k
            put.value = value
            size += len(key) + len(value)
        self.max_request_bytes = max(self.max_request_bytes, size)
        self.txn_count += 1
        self.put_count += len(items)
        kv = self._client.kv
        async with self._request("txn"):
            # The library's txn() only copies lists of messages into this same request.
            resp = await kv._rpc(kv._stub.Txn, request, operation="KV.Txn", timeout=self._timeout)
        if not resp.succeeded:
            await self._check_fence()
        return resp.succeeded, resp.header.revision

    async def txn_get(
        self, compares: Sequence[Compare], ops: Sequence[Put | Delete], get_on_failure: str
    ):
        """Like :meth:`txn`; on failure return the value of ``get_on_failure``."""
        if self.fence is not None:
            compares = [self.fence, *compares]
        request_ops = [_op(o) for o in ops]
        self.txn_count += 1
        self.put_count += sum(1 for o in ops if isinstance(o, Put))
        async with self._request("txn"):
            resp = await self._client.kv.txn(
                compares,
                request_ops,
                [RequestOp(request_range=rpc_pb2.RangeRequest(key=get_on_failure.encode()))],
                timeout=self._timeout,
            )
        if resp.succeeded:
            return True, resp.header.revision, None
        await self._check_fence()
        kvs = resp.responses[0].response_range.kvs
        return False, resp.header.revision, (kvs[0].value if kvs else None)

    async def delete_prefix(self, prefix: str) -> None:
        async with self._request("delete"):
            await self._client.kv.delete(
                prefix, range_end=prefix_range_end(prefix.encode()), timeout=self._timeout
            )

    # Leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        async with self._request("lease_grant"):
            resp = await self._client.lease.grant(ttl, timeout=self._timeout)
        return resp.ID

    def _open_keepalive(self, requests):
        lease = self._client.lease
        # The library opens a stream per renewal; the shared stream needs the raw call.
        return lease._stub.LeaseKeepAlive(requests, metadata=lease._metadata or None)

    async def keepalive(
        self, lease_id: int, timeout: float | None = None, shared: bool = True
    ) -> int:
        """Refresh a lease once; return its TTL, or 0 when it has expired.

        Renewals share one long-lived stream (see :mod:`tether.controller.lease_stream`);
        ``shared=False`` opens a stream of its own, so that one lease (the leader's) does
        not wait behind thousands of nodes' or fail with their stream.
        """
        async with self._request("lease_keepalive"):
            if shared:
                return await self._leases.keepalive(lease_id, timeout or self._timeout)
            call = self._client.lease.keep_alive(lease_id)
            try:
                async with asyncio.timeout(timeout or self._timeout):
                    async for resp in call:
                        return max(resp.TTL, 0)
            finally:
                call.cancel()
            return 0

    async def revoke_lease(self, lease_id: int) -> None:
        async with self._request("lease_revoke"):
            await self._client.lease.revoke(lease_id, timeout=self._timeout)

    # Watches ------------------------------------------------------------------------------

    async def watch(
        self, prefix: str, start_revision: int, created: asyncio.Future[int] | None = None
    ) -> AsyncIterator[Event]:
        """Yield every change under ``prefix`` from ``start_revision`` on (reconnecting).

        ``start_revision`` 0 watches from now; ``created`` then gets the revision the watch
        starts after. A watch from now is served at once, while one from a past revision
        waits for etcd's catch-up pass (every 100 ms): read a snapshot at ``created``'s
        revision instead of watching from an older snapshot's.
        """
        stream = self._client.watch.watch(
            prefix,
            range_end=prefix_range_end(prefix.encode()),
            start_revision=start_revision,
            prev_kv=True,
        )
        async for resp in stream:
            if created is not None and not created.done() and resp.created:
                created.set_result(resp.header.revision)
            if resp.compact_revision:
                from tether.controller.errors import OutOfRange

                raise OutOfRange(
                    f"revision {start_revision} was compacted (oldest is {resp.compact_revision})"
                )
            for ev in resp.events:
                yield Event(
                    key=ev.kv.key.decode(),
                    value=ev.kv.value,
                    revision=ev.kv.mod_revision,
                    deleted=ev.type == 1,
                    prev_value=ev.prev_kv.value if ev.HasField("prev_kv") else b"",
                    prev_lease=ev.prev_kv.lease if ev.HasField("prev_kv") else 0,
                )
