"""The wire codec: every message as a to/from pair, requests and responses, used by the clients and the server alike,
so the two sides cannot drift apart. The from_* functions of requests check what a client sent (sizes, lengths,
shapes) and raise `InvalidInput` naming the fix; the rest assume well-formed messages of their own making."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from latenthash.api import Query, SearchOptions, Stats
from latenthash.backend import Items, SearchResult, from_flat, parse_metadata_json
from latenthash.codes import n_bytes, pack_codes
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.errors import InvalidInput, LatentHashError
from latenthash.limits import MAX_BATCH_QUERIES, MAX_UPSERT_ITEMS
from latenthash.v1 import search_pb2 as pb

SEARCH_CHUNK = 1000  # queries per SearchBatch or SearchCodes call a client sends


# ------------------------------------------------------------------------------------------------ images
def image_message(image) -> dict:
    """One image as the fields of a Query, UpsertItem or EncodeRequest: bytes -> image; uint8 array (H, W[, C]) ->
    tensor; PIL image -> PNG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image": bytes(image)}
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise InvalidInput(f"an image array must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        return {"tensor": to_tensor(arr)}
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return {"image": buf.getvalue()}
    raise InvalidInput(f"cannot send {type(image).__name__} as an image: pass bytes, a uint8 array or PIL")


def image_list(images) -> list:
    """One image or a batch (a list, or a 4-D array) as a list of images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def to_tensor(image: np.ndarray) -> pb.ImageTensor:
    """A uint8 (H, W, C) array as an ImageTensor."""
    h, w, c = image.shape
    return pb.ImageTensor(data=np.ascontiguousarray(image).tobytes(), height=h, width=w, channels=c)


def from_tensor(t: pb.ImageTensor) -> np.ndarray:
    """An ImageTensor as a uint8 (1, H, W, C) array, its sizes checked."""
    if t.channels not in (1, 3) or not t.height or not t.width:
        raise InvalidInput(f"tensor needs height, width > 0 and channels 1 or 3, got {t.height}x{t.width}x{t.channels}")
    if len(t.data) != t.height * t.width * t.channels:
        raise InvalidInput(f"tensor data holds {len(t.data)} bytes; {t.height}x{t.width}x{t.channels} needs "
                           f"{t.height * t.width * t.channels}")
    return np.frombuffer(t.data, np.uint8).reshape(1, t.height, t.width, t.channels)


def _from_image(msg) -> object:
    """The image of a Query or UpsertItem: encoded bytes as they came, a tensor as a uint8 (1, H, W, C) array."""
    return [msg.image] if msg.WhichOneof(_ONEOF[type(msg)]) == "image" else from_tensor(msg.tensor)


_ONEOF = {pb.Query: "kind", pb.UpsertItem: "content"}


# ------------------------------------------------------------------------------------------------ searches
def _options_fields(options: SearchOptions) -> dict:
    fields = {"k": options.k, "pool": options.pool or 0}
    fields |= {name: value for name in ("radius", "rerank", "label")
               if (value := getattr(options, name)) is not None}
    return fields


def _options_of(req, metadata: bool = True) -> SearchOptions:
    return SearchOptions(req.k, req.pool or None, req.radius if req.HasField("radius") else None,
                         req.rerank if req.HasField("rerank") else None,
                         req.label if req.HasField("label") else None, metadata)


def code_rows(data: bytes, bits: int, what: str = "code") -> np.ndarray:
    """Packed codes sent back to back as uint8 (n, bits / 8) rows; InvalidInput unless whole codes."""
    nb = n_bytes(bits)
    n, extra = divmod(len(data), nb)
    if n == 0 or extra:
        if what == "code":
            raise InvalidInput(f"code has {len(data)} bytes; this index holds {bits}-bit codes ({nb} bytes, packed "
                               f"MSB-first)")
        raise InvalidInput(f"codes holds {len(data)} bytes: send n >= 1 packed {bits}-bit codes back to back, {nb} "
                           f"bytes each (MSB-first)")
    return np.frombuffer(data, np.uint8).reshape(n, nb)


def to_search_calls(query: Query, bits: int) -> list[tuple[str, object, int]]:
    """A query as the calls that carry it: (method, request, index of its first query). Images go one SearchRequest
    each (in SearchBatch calls of SEARCH_CHUNK when several), one code as a Search, several codes in SearchCodes
    calls (columnar) of SEARCH_CHUNK codes."""
    fields = _options_fields(query.options)
    if query.codes is None:
        reqs = [pb.SearchRequest(query=pb.Query(**image_message(im)), **fields) for im in image_list(query.images)]
        if len(reqs) == 1:
            return [("Search", reqs[0], 0)]
        return [("SearchBatch", pb.SearchBatchRequest(requests=reqs[lo:lo + SEARCH_CHUNK]), lo)
                for lo in range(0, len(reqs), SEARCH_CHUNK)]
    packed = pack_codes(query.codes, bits)
    feats = None
    if query.features is not None:
        feats = np.asarray(query.features, np.float32)
        feats = feats[None] if feats.ndim == 1 else feats
        if len(feats) != len(packed):
            raise InvalidInput(f"{len(packed)} codes but {len(feats)} feature rows")
    if len(packed) == 1:
        return [("Search", pb.SearchRequest(query=pb.Query(code=packed[0].tobytes(),
                                                           feature=[] if feats is None else feats[0]), **fields), 0)]
    return [("SearchCodes", pb.SearchCodesRequest(
        codes=packed[lo:lo + SEARCH_CHUNK].tobytes(),
        features=b"" if feats is None else feats[lo:lo + SEARCH_CHUNK].astype("<f4").tobytes(),
        skip_metadata=not query.options.metadata, **fields), lo) for lo in range(0, len(packed), SEARCH_CHUNK)]


def from_search_request(req: pb.SearchRequest, bits: int) -> Query:
    """A SearchRequest as a Query: a code (with its feature) or an image, decoded later by the Searcher."""
    if not req.HasField("query") or req.query.WhichOneof("kind") is None:
        raise InvalidInput("empty request: set query.image, query.tensor or query.code")
    q, options = req.query, _options_of(req)
    if q.WhichOneof("kind") == "code":
        return Query(code_rows(q.code, bits)[:1], np.asarray(q.feature, np.float32)[None] if q.feature else None,
                     options=options)
    return Query(images=_from_image(q), options=options)


def from_batch_request(req: pb.SearchBatchRequest, bits: int) -> list:
    """A SearchBatch's requests, each as a Query or the `LatentHashError` it raised (it fails alone)."""
    if not req.requests:
        raise InvalidInput("empty batch: add at least one request")
    if len(req.requests) > MAX_BATCH_QUERIES:
        raise InvalidInput(f"one SearchBatch takes at most {MAX_BATCH_QUERIES} requests; split it")
    return [query_or_error(r, bits) for r in req.requests]


def query_or_error(req: pb.SearchRequest, bits: int):
    """`from_search_request`, or the `LatentHashError` it raised: one bad request of many fails alone."""
    try:
        return from_search_request(req, bits)
    except LatentHashError as exc:
        return exc


def from_codes_request(req: pb.SearchCodesRequest, bits: int, feature_dim: int | None) -> Query:
    """A SearchCodes request as one Query of n codes (metadata off when the client skips it)."""
    codes = code_rows(req.codes, bits, "codes")
    n = len(codes)
    if n > MAX_BATCH_QUERIES:
        raise InvalidInput(f"one SearchCodes takes at most {MAX_BATCH_QUERIES} codes, got {n}; split it")
    features = None
    if req.features:
        if not feature_dim:
            raise InvalidInput("this index stores no features: leave features empty")
        if len(req.features) != n * feature_dim * 4:
            raise InvalidInput(f"features holds {len(req.features)} bytes; {n} codes need {n} x {feature_dim} "
                               f"float32 values ({n * feature_dim * 4} bytes, little-endian)")
        features = np.frombuffer(req.features, "<f4").reshape(n, feature_dim)
    return Query(codes, features, options=_options_of(req, metadata=not req.skip_metadata))


def call_responses(method: str, response) -> list:
    """The per-query responses of one search call's response."""
    return list(response.responses) if method == "SearchBatch" else [response]


# ------------------------------------------------------------------------------------------------ writes and reads
@dataclass
class UpsertItems:
    """An Upsert stream as read: per item its id, code row (None where an image is to be encoded), feature (None
    likewise, or where the index stores none) and metadata; `images` maps item positions to their images."""

    ids: list[int]
    codes: list
    features: list
    metadata: list
    images: dict[int, object]


def to_upsert_items(ids, bits: int, *, images=None, codes=None, features=None, metadata=None) -> list[pb.UpsertItem]:
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    if (images is None) == (codes is None):
        raise InvalidInput("upsert needs exactly one of images= or codes=")
    if metadata is not None and len(metadata) != len(ids):
        raise InvalidInput(f"{len(ids)} ids but {len(metadata)} metadata entries")
    meta = ["" if m is None else json.dumps(m) for m in metadata] if metadata is not None else [""] * len(ids)
    if images is not None:
        images = image_list(images)
        if len(images) != len(ids):
            raise InvalidInput(f"{len(ids)} ids but {len(images)} images")
        return [pb.UpsertItem(id=int(i), metadata_json=m, **image_message(im)) for i, im, m in zip(ids, images, meta)]
    packed = pack_codes(codes, bits)
    if len(packed) != len(ids):
        raise InvalidInput(f"{len(ids)} ids but {len(packed)} codes")
    feats = None if features is None else np.asarray(features, np.float32).reshape(len(ids), -1)
    return [pb.UpsertItem(id=int(i), code=c.tobytes(), feature=feats[j] if feats is not None else [], metadata_json=m)
            for j, (i, c, m) in enumerate(zip(ids, packed, meta))]


def from_upsert_items(items: Iterable, bits: int, feature_dim: int | None) -> UpsertItems:
    """An Upsert stream read and checked item by item as it arrives (an error names the item)."""
    out = UpsertItems([], [], [], [], {})
    for n, item in enumerate(items):
        if n >= MAX_UPSERT_ITEMS:
            raise InvalidInput(f"one Upsert stream takes at most {MAX_UPSERT_ITEMS} items; split the stream")
        try:
            kind = item.WhichOneof("content")
            if kind is None:
                raise InvalidInput(f"item {n} (id {item.id}): set image, tensor or code")
            out.ids.append(item.id)
            out.metadata.append(parse_metadata_json(item.metadata_json, n) if item.metadata_json else None)
            if kind == "code":
                out.codes.append(code_rows(item.code, bits)[0])
                if feature_dim and len(item.feature) != feature_dim:
                    raise InvalidInput(f"item {n} (id {item.id}): this index stores {feature_dim}-d features; got "
                                       f"{len(item.feature)} values")
                out.features.append(np.asarray(item.feature, np.float32) if feature_dim else None)
            else:
                out.codes.append(None)
                out.features.append(None)
                out.images[n] = item.image if kind == "image" else from_tensor(item.tensor)[0]
        except LatentHashError as exc:
            raise exc.at(n) from None
    if not out.ids:
        raise InvalidInput("empty Upsert stream: send at least one item")
    return out


def to_ids(request_type, ids):
    """A GetRequest or DeleteRequest for `ids`."""
    return request_type(ids=np.atleast_1d(np.asarray(ids, np.int64)).tolist())


def from_ids(req, call: str) -> np.ndarray:
    if not req.ids:
        raise InvalidInput(f"empty {call}: pass at least one id")
    return np.asarray(req.ids, np.int64)


def to_encode_request(images) -> pb.EncodeRequest:
    req = pb.EncodeRequest()
    for im in image_list(images):
        msg = image_message(im)
        req.images.append(msg["image"]) if "image" in msg else req.tensors.append(msg["tensor"])
    return req


def from_encode_request(req: pb.EncodeRequest) -> list:
    """The images of an EncodeRequest: encoded bytes first, then tensors, as the response orders them."""
    inputs = list(req.images) + [from_tensor(t)[0] for t in req.tensors]
    if not inputs:
        raise InvalidInput("empty Encode: pass images or tensors")
    return inputs


def to_duplicates_request(radius: int | None, min_score: float | None) -> pb.DuplicatesRequest:
    return pb.DuplicatesRequest(radius=radius, min_score=min_score)


def from_duplicates_request(req: pb.DuplicatesRequest) -> dict:
    return {"radius": req.radius if req.HasField("radius") else None,
            "min_score": req.min_score if req.HasField("min_score") else None}


# ------------------------------------------------------------------------------------------------ responses
def to_items(items: Items) -> pb.GetResponse:
    out = []
    for j, id_ in enumerate(items.ids.tolist()):
        meta = items.metadata[j]
        out.append(pb.Item(id=id_, code=items.codes[j].tobytes(),
                           feature=items.features[j].tolist() if items.features is not None else [],
                           metadata_json="" if meta is None else json.dumps(meta)))
    return pb.GetResponse(items=out)


def from_items(resp: pb.GetResponse) -> Items:
    feats = (np.asarray([list(it.feature) for it in resp.items], np.float32)
             if resp.items and resp.items[0].feature else None)
    return Items(np.asarray([it.id for it in resp.items], np.int64),
                 np.asarray([np.frombuffer(it.code, np.uint8) for it in resp.items]), feats,
                 [json.loads(it.metadata_json) if it.metadata_json else None for it in resp.items])


def to_encoded(enc: EncodeResult) -> pb.EncodeResponse:
    return pb.EncodeResponse(items=[pb.Encoded(code=c.tobytes(), feature=f.tolist())
                                    for c, f in zip(enc.codes, enc.features)])


def from_encoded(resp: pb.EncodeResponse) -> EncodeResult:
    return EncodeResult(np.asarray([np.frombuffer(e.code, np.uint8) for e in resp.items]),
                        np.asarray([list(e.feature) for e in resp.items], np.float32))


def to_stats(stats: Stats) -> pb.StatsResponse:
    return pb.StatsResponse(count=stats.count, bits=stats.bits, feature_dim=stats.feature_dim or 0,
                            index_bytes=stats.index_bytes, model_json=json.dumps(stats.model) if stats.model else "",
                            version=stats.version)


def from_stats(resp: pb.StatsResponse) -> Stats:
    return Stats(resp.count, resp.bits, resp.feature_dim or None, resp.index_bytes,
                 json.loads(resp.model_json) if resp.model_json else {}, resp.version)


def to_codes_response(result: SearchResult, metadata_json) -> pb.SearchCodesResponse:
    """A result's hits as flat columns, query after query, best first; `metadata_json(ids)` gives their metadata
    as stored JSON text (None: metadata not asked for)."""
    valid = np.arange(result.ids.shape[1]) < result.counts[:, None]
    ids = result.ids[valid]
    resp = pb.SearchCodesResponse(counts=result.counts.tolist(), ids=ids.tolist(),
                                  distances=result.distances[valid].tolist(), reranked=result.scores is not None)
    if result.scores is not None:
        resp.scores.extend(result.scores[valid].tolist())
    if metadata_json is not None:
        resp.metadata_json.extend([text or "" for text in metadata_json(ids)])
    return resp


def to_search_response(result: SearchResult, texts: list) -> pb.SearchResponse:
    """The first query of a result as a SearchResponse; `texts` its hits' metadata as stored JSON text."""
    hits = [pb.Hit(id=hit.id, distance=hit.distance, score=hit.score or 0.0, metadata_json=text or "")
            for hit, text in zip(result.hits(0), texts)]
    return pb.SearchResponse(hits=hits, reranked=result.scores is not None)


def from_search_responses(responses, metadata: bool) -> SearchResult:
    """SearchResponses (one per query) or SearchCodesResponses (columnar, several queries each) -> one result."""
    if responses and isinstance(responses[0], pb.SearchCodesResponse):
        counts = np.concatenate([np.asarray(r.counts, np.int64) for r in responses])
        flat: dict[str, list] = {"ids": [], "distances": [], "scores": [], "metadata_json": []}
        for r in responses:
            for name, values in flat.items():
                values.extend(getattr(r, name))
        reranked = responses[0].reranked
    else:
        counts = np.asarray([len(r.hits) for r in responses], np.int64)
        hits = [h for r in responses for h in r.hits]
        flat = {"ids": [h.id for h in hits], "distances": [h.distance for h in hits],
                "scores": [h.score for h in hits], "metadata_json": [h.metadata_json for h in hits]}
        reranked = any(r.reranked for r in responses)
    result = from_flat(counts, flat["ids"], flat["distances"], flat["scores"] if reranked else None)
    if metadata:
        decoded = [json.loads(t) if t else None for t in flat["metadata_json"]]
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        result.metadata = [decoded[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return result


def to_duplicate_group(group: DuplicateGroup) -> pb.DuplicateGroup:
    """A group with its metadata (Searcher.duplicates) as one message of the Duplicates stream."""
    meta = group.metadata or [None] * len(group)
    return pb.DuplicateGroup(items=[pb.DuplicateItem(id=i, score=s, metadata_json="" if m is None else json.dumps(m))
                                    for i, s, m in zip(group.ids.tolist(), group.scores.tolist(), meta)])


def from_duplicate_groups(messages) -> list[DuplicateGroup]:
    return [DuplicateGroup(np.asarray([it.id for it in g.items], np.int64),
                           np.asarray([it.score for it in g.items], np.float32),
                           [json.loads(it.metadata_json) if it.metadata_json else None for it in g.items])
            for g in messages]
