"""`Searcher`: an encoder and an index together, offering the calls the gRPC service offers, in-process.

The server is a thin translation of protobuf messages to these calls, and `Client` offers the same methods with
the same results over the network, so an application can move between embedded and remote use unchanged (the
congruence tests check that both return the same hits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from latenthash.backend import IndexBackend, Items, SearchResult, check_k, from_flat
from latenthash.codes import pack_codes
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import Encoder, EncodeResult
from latenthash.errors import InvalidInput, LatentHashError, ModelMismatch
from latenthash.limits import DEDUP_MIN_SCORE, DEDUP_RADIUS, default_pool


class Searcher:
    """Two-step image search over an index: `search(images=...)` or `search(codes=..., features=...)`."""

    def __init__(self, index: IndexBackend, encoder: Encoder | None = None):
        if encoder is not None and encoder.bits != index.bits:
            raise ModelMismatch(f"the model makes {encoder.bits}-bit codes but the index holds {index.bits}-bit codes")
        if encoder is not None and index.feature_dim not in (None, encoder.feature_dim):
            raise ModelMismatch(f"the model makes {encoder.feature_dim}-d features but the index stores "
                                f"{index.feature_dim}-d features")
        self.index = index
        self.encoder = encoder

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise InvalidInput("this searcher has no model: query by code, or open it with a model")
        return self.encoder

    def encode(self, images) -> EncodeResult:
        return self._require_encoder().encode(images)

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None, metadata: bool = True,
                   progress: bool = False) -> list[DuplicateGroup]:
        """Groups of near-duplicate items, largest first (see dedup.py; defaults in limits.py), with their metadata
        unless `metadata=False`. Embedded (directory) indexes only."""
        find = getattr(self.index, "duplicates", None)
        if find is None:
            raise InvalidInput("near-duplicate groups run on embedded (directory) indexes: sync one from this "
                               "backend (docs/scale.md) and run them there")
        groups = find(radius=DEDUP_RADIUS if radius is None else radius,
                      min_score=DEDUP_MIN_SCORE if min_score is None else min_score, progress=progress)
        return [replace(g, metadata=self.index.metadata(g.ids)) for g in groups] if metadata else groups

    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> SearchResult:
        """Search by images (encoded by the model; re-ranked by their features) or by packed codes (re-ranked when
        `features` are given). `label` keeps only items whose metadata "label" equals it (as text), applied to the
        step-1 pool. Hits carry their metadata unless `metadata=False` (then `result.metadata` is None)."""
        if (images is None) == (codes is None):
            raise InvalidInput("search needs exactly one of images= or codes=")
        check_k(k, self.index.max_k)
        if images is not None:
            enc = self.encode(images)
            codes, features = enc.codes, (enc.features if self.index.feature_dim else None)
        if label is None:
            result = self.index.search(codes, k, features=features, pool=pool, radius=radius, rerank=rerank)
        else:
            result = self._search_label(codes, k, features, pool, radius, rerank, str(label))
        return self.with_metadata(result) if metadata else result

    def search_many(self, requests: Sequence[tuple]) -> list:
        """Many queries at once, as a server receives them: each request is (codes (m, nb), features (m, D) or None,
        options) with options as `search` takes them (k, pool, radius, rerank, label). One index search per
        distinct set of options and shapes; a labelled request is searched on its own. Returns each request's
        `SearchResult` (the rows a search of its own would return; no metadata) or the `LatentHashError` it raised:
        a bad request is searched alone, so it never fails its neighbours."""
        groups: dict[tuple, list[int]] = {}
        out: list[Any] = [None] * len(requests)
        for i, (codes, features, options) in enumerate(requests):
            if options.get("label") is not None:
                try:
                    out[i] = self.search(codes=codes, features=features, metadata=False, **options)
                except LatentHashError as exc:
                    out[i] = exc
                continue
            shape = None if features is None else np.shape(features)[1:]  # unlike shapes never share a search
            plain = tuple(sorted((k, v) for k, v in options.items() if k != "label"))
            groups.setdefault((shape, np.shape(codes)[1:], plain), []).append(i)
        for (shape, _, options), members in groups.items():
            if len(members) == 1:  # the common case of one query: no copies
                codes, feats = requests[members[0]][:2]
            else:
                codes = np.concatenate([requests[i][0] for i in members])
                feats = None if shape is None else np.concatenate([requests[i][1] for i in members])
            try:
                res = self.index.search(codes, features=feats, **dict(options))
            except LatentHashError as exc:
                for i in members:
                    out[i] = exc if len(members) == 1 else self.search_many([requests[i]])[0]
                continue
            lo = 0
            for i in members:
                hi = lo + len(requests[i][0])
                width = max(int(res.counts[lo:hi].max(initial=0)), 1) if len(members) > 1 else res.ids.shape[1]
                out[i] = SearchResult(res.ids[lo:hi, :width], res.distances[lo:hi, :width], res.counts[lo:hi],
                                      None if res.scores is None else res.scores[lo:hi, :width])
                lo = hi
        return out

    def with_metadata(self, result: SearchResult) -> SearchResult:
        """Fill `result.metadata`: each hit's stored metadata, per query."""
        result.metadata = [self.index.metadata(row[:n]) for row, n in zip(result.ids, result.counts)]
        return result

    def _search_label(self, codes, k, features, pool, radius, rerank, label: str) -> SearchResult:
        """Filter the step-1 pool by label, then keep the best k (re-ranked order when re-ranking)."""
        width = max(k, min(default_pool(k) if pool is None else pool, self.index.max_k))  # the pool, as hits
        full = self.index.search(codes, width, features=features, pool=width, radius=radius, rerank=rerank)
        counts, rows, cols = [], [], []
        for i in range(len(full.ids)):
            keep = self._first_with_label(full.ids[i, :int(full.counts[i])], label, k)
            counts.append(len(keep))
            rows += [i] * len(keep)
            cols += keep
        return from_flat(counts, full.ids[rows, cols], full.distances[rows, cols],
                         None if full.scores is None else full.scores[rows, cols], width=k)

    def _first_with_label(self, ids: np.ndarray, label: str, k: int) -> list[int]:
        """Positions of the first k of `ids` (ranked hits) whose metadata label is `label`; metadata is read a
        block at a time and reading stops once k are found (a pool holds thousands of hits, k are wanted)."""
        keep: list[int] = []
        block = max(4 * k, 256)
        for lo in range(0, len(ids), block):
            meta = self.index.metadata(ids[lo:lo + block])
            keep += [lo + j for j, m in enumerate(meta) if _label_of(m) == label]
            if len(keep) >= k:
                break
        return keep[:k]

    def upsert(self, ids, *, images=None, codes=None, features=None,
               metadata: Sequence[Any] | None = None) -> tuple[int, int]:
        """Add or replace items from images (encoded here) or codes; returns (upserted, replaced)."""
        ids = np.atleast_1d(np.asarray(ids))
        if (images is None) == (codes is None):
            raise InvalidInput("upsert needs exactly one of images= or codes=")
        if images is not None:
            enc = self.encode(images)
            codes, features = enc.codes, enc.features if self.index.feature_dim else None
        replaced = self.index.add(ids, pack_codes(codes, self.index.bits), features, metadata)
        return len(ids), replaced

    def delete(self, ids) -> tuple[int, int]:
        """Remove items; returns (deleted, missing)."""
        ids = np.atleast_1d(np.asarray(ids))
        deleted = self.index.remove(ids)
        return deleted, len(ids) - deleted

    def get(self, ids) -> Items:
        return self.index.get(ids)

    def stats(self) -> dict:
        from latenthash import __version__

        out = dict(self.index.stats())
        out["model"] = self.encoder.info.to_dict() if self.encoder else {}
        out["version"] = __version__
        return out


def _label_of(meta: Any) -> str | None:
    if isinstance(meta, dict) and "label" in meta:
        value = meta["label"]
        return value if isinstance(value, str) else json.dumps(value)
    return None
