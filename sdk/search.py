"""`Searcher`: an encoder and an index together, offering the calls the gRPC service offers, in-process.

The server is a thin translation of protobuf messages to these calls, and `Client` offers the same methods with
the same results over the network, so an application can move between embedded and remote use unchanged (the
congruence tests check that both return the same hits).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from latenthash.api import Query, Stats
from latenthash.backend import IndexBackend, Items, SearchResult, from_flat
from latenthash.codes import pack_codes
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import Encoder, EncodeResult
from latenthash.errors import InvalidInput, LatentHashError, ModelMismatch
from latenthash.limits import pool_size


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
            raise InvalidInput("this searcher has no model (a server: --model): query by code instead of image, or "
                               "open it with a model")
        return self.encoder

    def decode(self, images) -> np.ndarray:
        """Images (arrays, encoded bytes, PIL) checked and decoded to the model's input, uint8 (N, H, W, C)."""
        return self._require_encoder().to_array(images)

    def encode(self, images) -> EncodeResult:
        return self._require_encoder().encode(images)

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                   margins: Sequence[float] | None = None, floor: float | None = None, metadata: bool = True,
                   progress: bool = False) -> list[DuplicateGroup]:
        """Groups of near-duplicate items, largest first (`HashIndex.duplicates`: by copy descriptors where the index
        keeps them and no radius or min_score is given, else by codes and features), with their metadata unless
        `metadata=False`. Embedded (directory) indexes only."""
        find = getattr(self.index, "duplicates", None)
        if find is None:
            raise InvalidInput("near-duplicate groups run on embedded (directory) indexes: sync one from this "
                               "backend (docs/scale.md) and run them there")
        groups = find(radius=radius, min_score=min_score, margins=margins, floor=floor, progress=progress)
        return [replace(g, metadata=self.index.metadata(g.ids)) for g in groups] if metadata else groups

    # ------------------------------------------------------------------------------------------ what it holds
    @property
    def describes_copies(self) -> bool:
        """Whether items added by image get copy descriptors: the model has a copy head and the index keeps them."""
        return self.encoder is not None and bool(self.encoder.info.copy_dim) and self.index.keeps_copies

    @property
    def bits(self) -> int:
        return self.index.bits

    @property
    def feature_dim(self) -> int | None:
        return self.index.feature_dim

    @property
    def max_k(self) -> int:
        return self.index.max_k

    def __len__(self) -> int:
        return len(self.index)

    def metadata_json(self, ids) -> list[str | None]:
        """The stored metadata of `ids` as JSON text, as stored (what the server sends on without decoding)."""
        return self.index.metadata_json(ids)

    def ping(self, timeout: float = 2.0) -> None:
        """Raises Unavailable when the index's backend cannot be reached (a Milvus that is down)."""
        self.index.ping(timeout)

    def warmup(self) -> float:
        return self.index.warmup()

    def save(self) -> bool:
        """Persist the index where it lives; False for an index with nowhere to save to."""
        if self.index.path is None:
            return False
        self.index.save()
        return True

    def _stored(self, features):
        """The features to search or store with: the given ones when the index stores features, else None (the
        one place that decides)."""
        return features if self.index.feature_dim else None

    # ------------------------------------------------------------------------------------------ searches
    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> SearchResult:
        """Search by images (encoded by the model; re-ranked by their features) or by packed codes (re-ranked when
        `features` are given). `label` keeps only items whose metadata "label" equals it (as text), applied to the
        step-1 pool. Hits carry their metadata unless `metadata=False` (then `result.metadata` is None)."""
        result = self.search_many([Query.of(images=images, codes=codes, features=features, k=k, pool=pool,
                                            radius=radius, rerank=rerank, label=label, metadata=metadata)])[0]
        if isinstance(result, LatentHashError):
            raise result
        return self.with_metadata(result) if metadata else result

    def encode_queries(self, queries: Sequence[Query | LatentHashError], encode: Callable | None = None) -> list:
        """Image queries encoded, all of a call's images in one encoder call (`encode`: the server's batcher, else
        the model), with their features when the index stores them. Each query as codes, or the
        `LatentHashError` that its images raised (decoded one query at a time, so a bad image fails its own);
        errors passed in are passed on."""
        out: list[Any] = list(queries)
        arrays, todo = [], []
        for i, q in enumerate(queries):
            if isinstance(q, Query) and q.codes is None:
                try:
                    arrays.append(self.decode(q.images))
                    todo.append(i)
                except LatentHashError as exc:
                    out[i] = exc
        if arrays:
            enc = (encode or self.encode)(np.concatenate(arrays))
            lo = 0
            for i, a in zip(todo, arrays):
                out[i] = replace(out[i], codes=enc.codes[lo:lo + len(a)], images=None,
                                 features=self._stored(enc.features[lo:lo + len(a)]))
                lo += len(a)
        return out

    def search_many(self, queries: Sequence[Query | LatentHashError], encode: Callable | None = None) -> list:
        """Many queries at once, as a server receives them (image queries are encoded first, see
        `encode_queries`). One index search per distinct set of options and shapes; a labelled query is searched
        on its own. Returns each query's `SearchResult` (the rows a search of its own would return; no metadata)
        or the `LatentHashError` it raised: a bad query is searched alone, so it never fails its neighbours; an
        error passed in is passed on."""
        if any(isinstance(q, Query) and q.codes is None for q in queries):
            queries = self.encode_queries(queries, encode)
        groups: dict[tuple, list[int]] = {}
        out: list[Any] = list(queries)
        for i, q in enumerate(queries):
            if isinstance(q, LatentHashError):
                continue
            try:
                q.options.checked(self.index.max_k)
                if q.options.label is not None:
                    out[i] = self._search_label(q)
                    continue
            except LatentHashError as exc:
                out[i] = exc
                continue
            shape = None if q.features is None else np.shape(q.features)[1:]  # unlike shapes never share a search
            o = q.options
            groups.setdefault((shape, np.shape(q.codes)[1:], o.k, o.pool, o.radius, o.rerank), []).append(i)
        for (shape, *_), members in groups.items():
            options = queries[members[0]].options
            if len(members) == 1:  # the common case of one query: no copies
                codes, feats = queries[members[0]].codes, queries[members[0]].features
            else:
                codes = np.concatenate([queries[i].codes for i in members])
                feats = None if shape is None else np.concatenate([queries[i].features for i in members])
            try:
                res = self.index.search(codes, features=feats, **options.index_options())
            except LatentHashError as exc:
                for i in members:
                    out[i] = exc if len(members) == 1 else self.search_many([queries[i]])[0]
                continue
            lo = 0
            for i in members:
                hi = lo + len(queries[i])
                width = max(int(res.counts[lo:hi].max(initial=0)), 1) if len(members) > 1 else res.ids.shape[1]
                out[i] = SearchResult(res.ids[lo:hi, :width], res.distances[lo:hi, :width], res.counts[lo:hi],
                                      None if res.scores is None else res.scores[lo:hi, :width])
                lo = hi
        return out

    def with_metadata(self, result: SearchResult) -> SearchResult:
        """Fill `result.metadata`: each hit's stored metadata, per query."""
        result.metadata = [self.index.metadata(row[:n]) for row, n in zip(result.ids, result.counts)]
        return result

    def _search_label(self, q: Query) -> SearchResult:
        """Filter the step-1 pool by label, then keep the best k (re-ranked order when re-ranking)."""
        k, label = q.options.k, str(q.options.label)
        width = max(k, min(pool_size(k, q.options.pool), self.index.max_k))  # the pool, as hits
        full = self.index.search(q.codes, width, features=q.features, pool=width, radius=q.options.radius,
                                 rerank=q.options.rerank)
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

    def upsert(self, ids, *, images=None, codes=None, features=None, metadata: Sequence[Any] | None = None,
               copies=None) -> tuple[int, int]:
        """Add or replace items from images (encoded here, with copy descriptors where the model and the index
        have them) or codes (`copies`: their descriptors, if any); returns (upserted, replaced)."""
        ids = np.atleast_1d(np.asarray(ids))
        if (images is None) == (codes is None):
            raise InvalidInput("upsert needs exactly one of images= or codes=")
        if images is not None:
            encoder = self._require_encoder()
            batch = encoder.to_array(images)
            enc = encoder.encode(batch)
            codes, features = enc.codes, enc.features
            if self.describes_copies:
                copies = encoder.describe_copies(batch)
        replaced = self.index.add(ids, pack_codes(codes, self.index.bits), self._stored(features), metadata,
                                  copies=copies)
        return len(ids), replaced

    def delete(self, ids) -> tuple[int, int]:
        """Remove items; returns (deleted, missing)."""
        ids = np.atleast_1d(np.asarray(ids))
        deleted = self.index.remove(ids)
        return deleted, len(ids) - deleted

    def get(self, ids) -> Items:
        return self.index.get(ids)

    def stats(self) -> Stats:
        from latenthash import __version__

        raw = self.index.stats()
        return Stats(int(raw["count"]), int(raw["bits"]), raw["feature_dim"], int(raw["index_bytes"]),
                     self.encoder.info.to_dict() if self.encoder else {}, __version__)


def _label_of(meta: Any) -> str | None:
    if isinstance(meta, dict) and "label" in meta:
        value = meta["label"]
        return value if isinstance(value, str) else json.dumps(value)
    return None
