"""Thin gRPC clients, sync (`Client`) and asyncio (`AsyncClient`), implementing `SearchAPI` as the embedded
`Searcher` does, with the same exception family: a status code from the server is raised as the class it came from.

Each call is written once, as a plan: a generator that yields its calls' messages (built and read by the wire
codec) and receives their responses. `Client` runs plans blocking, `AsyncClient` awaits them, so the two cannot
drift apart. Deadlines: every call has one (`timeout`, seconds); retries: see channel.py.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

import grpc

from latenthash import errors, wire
from latenthash.api import Query, Stats
from latenthash.backend import Items, SearchResult
from latenthash.channel import connect, rpc_error
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.limits import MAX_MESSAGE_MB
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

T = TypeVar("T")
P = ParamSpec("P")
Plan = Generator[tuple[str, Any, "float | None"], Any, T]  # yields (method, request, timeout); returns the result


class _Plans:
    """Every call of `SearchAPI` written once, as a plan (see the module docstring); `_blocking` and `_awaited` turn
    them into the clients' methods, and each client's `_run` drives them."""

    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> Plan[SearchResult]:
        """As `Searcher.search`. Several codes go in SearchCodes calls (columnar), images in SearchBatch calls."""
        query = Query.of(images=images, codes=codes, features=features, k=k, pool=pool, radius=radius, rerank=rerank,
                         label=label, metadata=metadata)
        bits = (yield from _bits_plan(self)) if codes is not None else 0
        responses: list = []
        for method, request, first in wire.to_search_calls(query, bits):
            try:
                responses += wire.call_responses(method, (yield method, request, None))
            except errors.LatentHashError as exc:  # the server numbers a batch's requests from 0
                if first and exc.request_index is not None:
                    exc.request_index += first
                raise
        return wire.from_search_responses(responses, metadata)

    def upsert(self, ids, *, images=None, codes=None, features=None,
               metadata: Sequence[Any] | None = None) -> Plan[tuple[int, int]]:
        bits = (yield from _bits_plan(self)) if codes is not None else 0
        items = wire.to_upsert_items(ids, bits, images=images, codes=codes, features=features, metadata=metadata)
        resp = yield "Upsert", iter(items), None
        return resp.upserted, resp.replaced

    def delete(self, ids) -> Plan[tuple[int, int]]:
        resp = yield "Delete", wire.to_ids(pb.DeleteRequest, ids), None
        return resp.deleted, resp.missing

    def get(self, ids) -> Plan[Items]:
        return wire.from_items((yield "Get", wire.to_ids(pb.GetRequest, ids), None))

    def stats(self) -> Plan[Stats]:
        return wire.from_stats((yield "Stats", pb.StatsRequest(), None))

    def encode(self, images) -> Plan[EncodeResult]:
        return wire.from_encoded((yield "Encode", wire.to_encode_request(images), None))

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                   timeout: float | None = None) -> Plan[list[DuplicateGroup]]:
        """As `Searcher.duplicates`; `timeout` (default: the client's) bounds the whole call, which at a million
        items takes minutes."""
        return wire.from_duplicate_groups((yield "Duplicates", wire.to_duplicates_request(radius, min_score), timeout))


def _bits_plan(client) -> Plan[int]:
    if client._bits is None:
        client._bits = wire.from_stats((yield "Stats", pb.StatsRequest(), None)).bits
    return client._bits


class _Steps(Generic[T]):
    """A plan's calls, one at a time: each iteration gives the next (method, request, timeout); set `reply` to its
    response, or to the error it failed with (raised inside the plan, where it may name a batch's query). `value`
    is the plan's result once the iteration ends."""

    def __init__(self, plan: Plan[T]):
        self.plan = plan
        self.reply: Any = None
        self.value: T

    def __iter__(self) -> _Steps[T]:
        return self

    def __next__(self) -> tuple[str, Any, float | None]:
        reply, self.reply = self.reply, None
        try:
            return self.plan.throw(reply) if isinstance(reply, errors.LatentHashError) else self.plan.send(reply)
        except StopIteration as done:
            self.value = done.value
            raise


def _blocking(plan: Callable[P, Plan[T]]) -> Callable[P, T]:
    @functools.wraps(plan)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return args[0]._run(plan(*args, **kwargs))  # type: ignore[attr-defined]

    return call


def _awaited(plan: Callable[P, Plan[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(plan)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return await args[0]._run(plan(*args, **kwargs))  # type: ignore[attr-defined]

    return call


class _Connection:
    """A channel to `target` (see channel.py), its stub, the calls' deadline and the server's code length."""

    aio = False
    _bits: int | None = None

    def __init__(self, target: str, *, token: str | None = None, tls: bool | str | Path = False,
                 timeout: float = 30.0, retries: int = 3, max_message_mb: int = MAX_MESSAGE_MB):
        self.channel, self._metadata = connect(target, token, tls, retries, max_message_mb, aio=self.aio)
        self._stub = pb_grpc.HashSearchStub(self.channel)
        self.timeout = timeout


class Client(_Connection):
    """`Client("host:port", token=..., tls=True | "ca.pem")`: the Searcher's calls over gRPC."""

    search, upsert, delete, get = (_blocking(_Plans.search), _blocking(_Plans.upsert), _blocking(_Plans.delete),
                                   _blocking(_Plans.get))
    stats, encode, duplicates = _blocking(_Plans.stats), _blocking(_Plans.encode), _blocking(_Plans.duplicates)

    def _run(self, plan: Plan[T]) -> T:
        steps = _Steps(plan)
        for method, request, timeout in steps:
            try:
                call = getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
                steps.reply = list(call) if method == "Duplicates" else call  # a server stream is read here
            except grpc.RpcError as exc:
                steps.reply = rpc_error(exc)
        return steps.value

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Connection):
    """The asyncio variant of `Client`: the same methods, awaited."""

    aio = True
    search, upsert, delete, get = (_awaited(_Plans.search), _awaited(_Plans.upsert), _awaited(_Plans.delete),
                                   _awaited(_Plans.get))
    stats, encode, duplicates = _awaited(_Plans.stats), _awaited(_Plans.encode), _awaited(_Plans.duplicates)

    async def _run(self, plan: Plan[T]) -> T:
        steps = _Steps(plan)
        for method, request, timeout in steps:
            try:
                call = getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
                steps.reply = [m async for m in call] if method == "Duplicates" else await call
            except grpc.RpcError as exc:
                steps.reply = rpc_error(exc)
        return steps.value

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
