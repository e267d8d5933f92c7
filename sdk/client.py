"""Thin gRPC clients, sync (`Client`) and asyncio (`AsyncClient`), with the calls and results of the embedded
`Searcher`, and the same exception family: a status code from the server is raised as the class it came from.

Retries: calls that fail with UNAVAILABLE are retried with exponential backoff by gRPC's own retry policy.
Deadlines: every call has one (`timeout`, seconds).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from latenthash import errors, wire
from latenthash.backend import Items, SearchResult
from latenthash.codes import pack_codes
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

STATUS_TO_ERROR = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ModelMismatch,
    grpc.StatusCode.DATA_LOSS: errors.IndexCorrupt,
    grpc.StatusCode.UNIMPLEMENTED: errors.MissingDependency,
}


SEARCH_CHUNK = 1000  # queries per SearchBatch call


def _retry_config(retries: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": "latenthash.v1.HashSearch"}],
        "retryPolicy": {"maxAttempts": retries + 1, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def _error(exc: grpc.RpcError) -> errors.LatentHashError:
    default = STATUS_TO_ERROR.get(exc.code(), errors.LatentHashError)
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return errors.from_status(exc.code().name, exc.details(), trailers, default)


def _channel_args(token, tls, retries, max_message_mb):
    options = [("grpc.max_receive_message_length", max_message_mb << 20),
               ("grpc.max_send_message_length", max_message_mb << 20)]
    if retries > 0:  # gRPC's policy counts attempts, at least 2
        options += [("grpc.enable_retries", 1), ("grpc.service_config", _retry_config(retries))]
    else:
        options.append(("grpc.enable_retries", 0))
    creds = None
    if tls:
        root = Path(tls).read_bytes() if isinstance(tls, (str, Path)) else None
        creds = grpc.ssl_channel_credentials(root_certificates=root)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return options, creds, metadata


# ------------------------------------------------------------------------------------------ request building
def _image_message(image) -> dict:
    """bytes -> image; uint8 array (H, W[, C]) -> tensor; PIL image -> PNG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image": bytes(image)}
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise errors.InvalidInput(f"an image array must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                                      f"{image.shape}")
        return {"tensor": wire.to_tensor(arr)}
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return {"image": buf.getvalue()}
    raise errors.InvalidInput(f"cannot send {type(image).__name__} as an image: pass bytes, a uint8 array or PIL")


def _as_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _search_options(k, pool, radius, rerank, label) -> dict:
    opts = {"k": k, "pool": pool or 0}
    if radius is not None:
        opts["radius"] = radius
    if rerank is not None:
        opts["rerank"] = rerank
    if label is not None:
        opts["label"] = str(label)
    return opts


def _search_requests(bits_fn, *, images, codes, features, k, pool, radius, rerank, label, metadata) -> list:
    """SearchRequests for images, or SearchCodesRequests (chunks of SEARCH_CHUNK) for several codes."""
    if (images is None) == (codes is None):
        raise errors.InvalidInput("search needs exactly one of images= or codes=")
    opts = _search_options(k, pool, radius, rerank, label)
    if images is not None:
        return [pb.SearchRequest(query=pb.Query(**_image_message(im)), **opts) for im in _as_list(images)]
    packed = pack_codes(codes, bits_fn())
    feats = None
    if features is not None:
        feats = np.asarray(features, np.float32)
        feats = feats[None] if feats.ndim == 1 else feats
        if len(feats) != len(packed):
            raise errors.InvalidInput(f"{len(packed)} codes but {len(feats)} feature rows")
    if len(packed) == 1:
        return [pb.SearchRequest(query=pb.Query(code=packed[0].tobytes(), feature=feats[0] if feats is not None
                                                else []), **opts)]
    return [pb.SearchCodesRequest(codes=packed[lo:lo + SEARCH_CHUNK].tobytes(),
                                  features=(b"" if feats is None
                                            else feats[lo:lo + SEARCH_CHUNK].astype("<f4").tobytes()),
                                  skip_metadata=not metadata, **opts) for lo in range(0, len(packed), SEARCH_CHUNK)]


def _search_calls(reqs: list) -> list[tuple[str, Any, int]]:
    """(method, request, index of its first query) for `_search_requests`' output: SearchCodes calls as built, one
    Search for a single query, SearchBatch calls of at most SEARCH_CHUNK queries otherwise."""
    if reqs and isinstance(reqs[0], pb.SearchCodesRequest):
        return [("SearchCodes", r, 0) for r in reqs]
    if len(reqs) == 1:
        return [("Search", reqs[0], 0)]
    return [("SearchBatch", pb.SearchBatchRequest(requests=reqs[lo:lo + SEARCH_CHUNK]), lo)
            for lo in range(0, len(reqs), SEARCH_CHUNK)]


def _responses(method: str, response) -> list:
    return list(response.responses) if method == "SearchBatch" else [response]


@contextlib.contextmanager
def _chunk_errors(offset: int):
    """The server numbers a batch's requests from 0: name the caller's query instead."""
    try:
        yield
    except errors.LatentHashError as exc:
        if offset and exc.request_index is not None:
            exc.request_index += offset
        raise


def _upsert_items(bits_fn, ids, *, images, codes, features, metadata):
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    if (images is None) == (codes is None):
        raise errors.InvalidInput("upsert needs exactly one of images= or codes=")
    if metadata is not None and len(metadata) != len(ids):
        raise errors.InvalidInput(f"{len(ids)} ids but {len(metadata)} metadata entries")
    meta = ["" if m is None else json.dumps(m) for m in metadata] if metadata is not None else [""] * len(ids)
    if images is not None:
        images = _as_list(images)
        if len(images) != len(ids):
            raise errors.InvalidInput(f"{len(ids)} ids but {len(images)} images")
        return [pb.UpsertItem(id=int(i), metadata_json=m, **_image_message(im)) for i, im, m in zip(ids, images, meta)]
    packed = pack_codes(codes, bits_fn())
    if len(packed) != len(ids):
        raise errors.InvalidInput(f"{len(ids)} ids but {len(packed)} codes")
    feats = None if features is None else np.asarray(features, np.float32).reshape(len(ids), -1)
    return [pb.UpsertItem(id=int(i), code=c.tobytes(), feature=feats[j] if feats is not None else [], metadata_json=m)
            for j, (i, c, m) in enumerate(zip(ids, packed, meta))]


def _get_request(ids) -> pb.GetRequest:
    return pb.GetRequest(ids=np.atleast_1d(np.asarray(ids, np.int64)).tolist())


def _encode_request(images) -> pb.EncodeRequest:
    req = pb.EncodeRequest()
    for im in _as_list(images):
        msg = _image_message(im)
        req.images.append(msg["image"]) if "image" in msg else req.tensors.append(msg["tensor"])
    return req


# ------------------------------------------------------------------------------------------------ clients
class Client:
    """`Client("host:port", token=..., tls=True | "ca.pem")`: the Searcher's calls over gRPC."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | str | Path = False,
                 timeout: float = 30.0, retries: int = 3, max_message_mb: int = 64):
        options, creds, self._metadata = _channel_args(token, tls, retries, max_message_mb)
        self.channel = (grpc.secure_channel(target, creds, options) if creds
                        else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.HashSearchStub(self.channel)
        self.timeout = timeout
        self._bits: int | None = None

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def bits(self) -> int:
        if self._bits is None:
            self._bits = self.stats()["bits"]
        return self._bits

    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> SearchResult:
        """As `Searcher.search`. Several codes go in SearchCodes calls (columnar), images in SearchBatch calls."""
        reqs = _search_requests(self.bits, images=images, codes=codes, features=features, k=k, pool=pool,
                                radius=radius, rerank=rerank, label=label, metadata=metadata)
        responses: list = []
        for method, request, first in _search_calls(reqs):
            with _chunk_errors(first):
                responses += _responses(method, self._call(method, request))
        return wire.from_search_responses(responses, metadata)

    def upsert(self, ids, *, images=None, codes=None, features=None,
               metadata: Sequence[Any] | None = None) -> tuple[int, int]:
        items = _upsert_items(self.bits, ids, images=images, codes=codes, features=features, metadata=metadata)
        resp = self._call("Upsert", iter(items))
        return resp.upserted, resp.replaced

    def delete(self, ids) -> tuple[int, int]:
        resp = self._call("Delete", pb.DeleteRequest(ids=np.atleast_1d(np.asarray(ids, np.int64)).tolist()))
        return resp.deleted, resp.missing

    def get(self, ids) -> Items:
        return wire.from_items(self._call("Get", _get_request(ids)))

    def stats(self) -> dict:
        return wire.from_stats(self._call("Stats", pb.StatsRequest()))

    def encode(self, images) -> EncodeResult:
        return wire.from_encoded(self._call("Encode", _encode_request(images)))

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                   timeout: float | None = None) -> list[DuplicateGroup]:
        """As `Searcher.duplicates`; `timeout` (default: the client's) bounds the whole call, which at a million
        items takes minutes."""
        request = pb.DuplicatesRequest(radius=radius, min_score=min_score)
        try:
            stream = self._stub.Duplicates(request, timeout=timeout or self.timeout, metadata=self._metadata)
            return wire.from_duplicate_groups(stream)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio variant of `Client`: the same methods, awaited."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool | str | Path = False,
                 timeout: float = 30.0, retries: int = 3, max_message_mb: int = 64):
        options, creds, self._metadata = _channel_args(token, tls, retries, max_message_mb)
        self.channel = (grpc.aio.secure_channel(target, creds, options) if creds
                        else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.HashSearchStub(self.channel)
        self.timeout = timeout
        self._bits: int | None = None

    async def _call(self, method: str, request):
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def _bits_value(self) -> int:
        if self._bits is None:
            self._bits = (await self.stats())["bits"]
        return self._bits

    async def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
                     radius: int | None = None, rerank: bool | None = None, label: str | None = None,
                     metadata: bool = True) -> SearchResult:
        bits = await self._bits_value() if codes is not None else 0
        reqs = _search_requests(lambda: bits, images=images, codes=codes, features=features, k=k, pool=pool,
                                radius=radius, rerank=rerank, label=label, metadata=metadata)
        responses: list = []
        for method, request, first in _search_calls(reqs):
            with _chunk_errors(first):
                responses += _responses(method, await self._call(method, request))
        return wire.from_search_responses(responses, metadata)

    async def upsert(self, ids, *, images=None, codes=None, features=None,
                     metadata: Sequence[Any] | None = None) -> tuple[int, int]:
        bits = await self._bits_value() if codes is not None else 0
        items = _upsert_items(lambda: bits, ids, images=images, codes=codes, features=features, metadata=metadata)
        resp = await self._call("Upsert", iter(items))
        return resp.upserted, resp.replaced

    async def delete(self, ids) -> tuple[int, int]:
        resp = await self._call("Delete", pb.DeleteRequest(ids=np.atleast_1d(np.asarray(ids, np.int64)).tolist()))
        return resp.deleted, resp.missing

    async def get(self, ids) -> Items:
        return wire.from_items(await self._call("Get", _get_request(ids)))

    async def stats(self) -> dict:
        return wire.from_stats(await self._call("Stats", pb.StatsRequest()))

    async def encode(self, images) -> EncodeResult:
        return wire.from_encoded(await self._call("Encode", _encode_request(images)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
