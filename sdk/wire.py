"""The wire codec: numpy results and items to protobuf messages and back, one pair of functions per message, used by
the server (to_*) and the clients (from_*) alike, so the two sides cannot drift apart. Validation of what a client
sent stays in the server; these functions assume well-formed messages of their own making."""

from __future__ import annotations

import json

import numpy as np

from latenthash.backend import Items, SearchResult, from_flat
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.v1 import search_pb2 as pb


def to_tensor(image: np.ndarray) -> pb.ImageTensor:
    """A uint8 (H, W, C) array as an ImageTensor."""
    h, w, c = image.shape
    return pb.ImageTensor(data=np.ascontiguousarray(image).tobytes(), height=h, width=w, channels=c)


def from_tensor(t: pb.ImageTensor) -> np.ndarray:
    """An ImageTensor (its sizes already checked) as a uint8 (1, H, W, C) array."""
    return np.frombuffer(t.data, np.uint8).reshape(1, t.height, t.width, t.channels)


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


def to_stats(stats: dict) -> pb.StatsResponse:
    return pb.StatsResponse(count=stats["count"], bits=stats["bits"], feature_dim=stats["feature_dim"] or 0,
                            index_bytes=stats["index_bytes"],
                            model_json=json.dumps(stats["model"]) if stats["model"] else "", version=stats["version"])


def from_stats(resp: pb.StatsResponse) -> dict:
    return {"count": resp.count, "bits": resp.bits, "feature_dim": resp.feature_dim or None,
            "index_bytes": resp.index_bytes, "model": json.loads(resp.model_json) if resp.model_json else {},
            "version": resp.version}


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
    hits = [pb.Hit(id=id_, distance=dist, score=score or 0.0, metadata_json=text or "")
            for (id_, dist, score), text in zip(result.hits(0), texts)]
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
