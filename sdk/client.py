"""Thin gRPC clients, sync (`Client`) and asyncio (`AsyncClient`), implementing `SearchAPI` as the embedded
`Searcher` does, with the same exception family: a status code from the server is raised as the class it came from.

Each call is written once, as a plan: a generator that yields (method, request) and receives the response, built
and read by the wire codec. `Client` runs plans with blocking calls, `AsyncClient` awaits them, so the two cannot
drift apart. Retries: calls that fail with UNAVAILABLE are retried with exponential backoff by gRPC's own retry
policy. Deadlines: every call has one (`timeout`, seconds).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import grpc

from latenthash import errors, wire
from latenthash.api import Query, SearchOptions
from latenthash.backend import Items, SearchResult
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.limits import MAX_MESSAGE_MB
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

Plan = Generator[tuple[str, Any, float | None], Any, Any]  # yields (method, request, timeout), returns the result


def _error(exc: grpc.RpcError) -> errors.LatentHashError:
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return errors.from_status(exc.code().name, exc.details(), trailers)


def _channel_args(token, tls, retries, max_message_mb):
    options = [("grpc.max_receive_message_length", max_message_mb << 20),
               ("grpc.max_send_message_length", max_message_mb << 20)]
    if retries > 0:  # gRPC's policy counts attempts, at least 2
        config = {"methodConfig": [{"name": [{"service": "latenthash.v1.HashSearch"}], "retryPolicy": {
            "maxAttempts": retries + 1, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]}
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    else:
        options.append(("grpc.enable_retries", 0))
    creds = None
    if tls:
        root = Path(tls).read_bytes() if isinstance(tls, (str, Path)) else None
        creds = grpc.ssl_channel_credentials(root_certificates=root)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return options, creds, metadata


class _Plans:
    """Every call of `SearchAPI` as a plan (see the module docstring); subclasses drive them."""

    _bits: int | None = None

    def _bits_plan(self) -> Plan:
        if self._bits is None:
            self._bits = wire.from_stats((yield "Stats", pb.StatsRequest(), None))["bits"]
        return self._bits

    def _search_plan(self, query: Query) -> Plan:
        bits = (yield from self._bits_plan()) if query.codes is not None else 0
        responses: list = []
        for method, request, first in wire.to_search_calls(query, bits):
            try:
                responses += wire.call_responses(method, (yield method, request, None))
            except errors.LatentHashError as exc:  # the server numbers a batch's requests from 0
                if first and exc.request_index is not None:
                    exc.request_index += first
                raise
        return wire.from_search_responses(responses, query.options.metadata)

    def _upsert_plan(self, ids, images, codes, features, metadata) -> Plan:
        bits = (yield from self._bits_plan()) if codes is not None else 0
        items = wire.to_upsert_items(ids, bits, images=images, codes=codes, features=features, metadata=metadata)
        resp = yield "Upsert", iter(items), None
        return resp.upserted, resp.replaced

    def _plan(self, name: str, *args, timeout: float | None = None) -> Plan:
        """The one-message calls: (request, response decoder) by name."""
        request, decode = {
            "delete": lambda: (wire.to_ids(pb.DeleteRequest, *args), lambda r: (r.deleted, r.missing)),
            "get": lambda: (wire.to_ids(pb.GetRequest, *args), wire.from_items),
            "stats": lambda: (pb.StatsRequest(), wire.from_stats),
            "encode": lambda: (wire.to_encode_request(*args), wire.from_encoded),
            "duplicates": lambda: (wire.to_duplicates_request(*args), wire.from_duplicate_groups),
        }[name]()
        return decode((yield name.capitalize(), request, timeout))

    def _run(self, plan: Plan):
        raise NotImplementedError


def _search_query(images, codes, features, k, pool, radius, rerank, label, metadata) -> Query:
    if (images is None) == (codes is None):
        raise errors.InvalidInput("search needs exactly one of images= or codes=")
    return Query(codes, features, images, SearchOptions(k, pool, radius, rerank,
                                                        None if label is None else str(label), metadata))


class Client(_Plans):
    """`Client("host:port", token=..., tls=True | "ca.pem")`: the Searcher's calls over gRPC."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | str | Path = False,
                 timeout: float = 30.0, retries: int = 3, max_message_mb: int = MAX_MESSAGE_MB):
        options, creds, self._metadata = _channel_args(token, tls, retries, max_message_mb)
        self.channel = (grpc.secure_channel(target, creds, options) if creds
                        else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.HashSearchStub(self.channel)
        self.timeout = timeout

    def _run(self, plan: Plan):
        step, send, fail = plan.send, None, None
        try:
            while True:
                method, request, timeout = step(send) if fail is None else plan.throw(fail)
                send, fail = None, None
                try:
                    send = getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                                       metadata=self._metadata)
                    if method == "Duplicates":  # a server stream: read it here, where its errors are caught
                        send = list(send)
                except grpc.RpcError as exc:
                    fail = _error(exc)
        except StopIteration as done:
            return done.value

    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> SearchResult:
        """As `Searcher.search`. Several codes go in SearchCodes calls (columnar), images in SearchBatch calls."""
        return self._run(self._search_plan(_search_query(images, codes, features, k, pool, radius, rerank, label,
                                                         metadata)))

    def upsert(self, ids, *, images=None, codes=None, features=None,
               metadata: Sequence[Any] | None = None) -> tuple[int, int]:
        return self._run(self._upsert_plan(ids, images, codes, features, metadata))

    def delete(self, ids) -> tuple[int, int]:
        return self._run(self._plan("delete", ids))

    def get(self, ids) -> Items:
        return self._run(self._plan("get", ids))

    def stats(self) -> dict:
        return self._run(self._plan("stats"))

    def encode(self, images) -> EncodeResult:
        return self._run(self._plan("encode", images))

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                   timeout: float | None = None) -> list[DuplicateGroup]:
        """As `Searcher.duplicates`; `timeout` (default: the client's) bounds the whole call, which at a million
        items takes minutes."""
        return self._run(self._plan("duplicates", radius, min_score, timeout=timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Plans):
    """The asyncio variant of `Client`: the same methods, awaited."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | str | Path = False,
                 timeout: float = 30.0, retries: int = 3, max_message_mb: int = MAX_MESSAGE_MB):
        options, creds, self._metadata = _channel_args(token, tls, retries, max_message_mb)
        self.channel = (grpc.aio.secure_channel(target, creds, options) if creds
                        else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.HashSearchStub(self.channel)
        self.timeout = timeout

    async def _run(self, plan: Plan):  # type: ignore[override]
        step, send, fail = plan.send, None, None
        try:
            while True:
                method, request, timeout = step(send) if fail is None else plan.throw(fail)
                send, fail = None, None
                try:
                    call = getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                                       metadata=self._metadata)
                    send = [m async for m in call] if method == "Duplicates" else await call
                except grpc.RpcError as exc:
                    fail = _error(exc)
        except StopIteration as done:
            return done.value

    async def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
                     radius: int | None = None, rerank: bool | None = None, label: str | None = None,
                     metadata: bool = True) -> SearchResult:
        return await self._run(self._search_plan(_search_query(images, codes, features, k, pool, radius, rerank,
                                                               label, metadata)))

    async def upsert(self, ids, *, images=None, codes=None, features=None,
                     metadata: Sequence[Any] | None = None) -> tuple[int, int]:
        return await self._run(self._upsert_plan(ids, images, codes, features, metadata))

    async def delete(self, ids) -> tuple[int, int]:
        return await self._run(self._plan("delete", ids))

    async def get(self, ids) -> Items:
        return await self._run(self._plan("get", ids))

    async def stats(self) -> dict:
        return await self._run(self._plan("stats"))

    async def encode(self, images) -> EncodeResult:
        return await self._run(self._plan("encode", images))

    async def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                         timeout: float | None = None) -> list[DuplicateGroup]:
        return await self._run(self._plan("duplicates", radius, min_score, timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
