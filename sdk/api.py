"""The search facade's types: what a search asks (`Query` with its `SearchOptions`) and the one interface
(`SearchAPI`) that the embedded `Searcher` and the remote `Client` implement alike (`AsyncClient` too, awaited).

An application writes against `SearchAPI` and moves between embedded and remote use unchanged; the congruence tests
run both through it and compare the answers. The server decodes each request into a `Query` (wire.py) and hands it
to the Searcher, so one request type flows from the client to the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from latenthash.backend import Items, SearchResult, check_k
from latenthash.dedup import DuplicateGroup
from latenthash.encoder import EncodeResult
from latenthash.errors import InvalidInput


@dataclass(frozen=True)
class SearchOptions:
    """How to search: `k` hits per query; step 1's `pool` (default `limits.pool_size`) or a Hamming `radius`;
    `rerank` (None: re-rank whenever query features are present); `label` keeps only items whose metadata "label"
    equals it; `metadata` returns each hit's stored metadata."""

    k: int = 10
    pool: int | None = None
    radius: int | None = None
    rerank: bool | None = None
    label: str | None = None
    metadata: bool = True

    def checked(self, max_k: int) -> SearchOptions:
        """These options, k checked against a backend's limit (pool and radius are checked by the backend)."""
        check_k(self.k, max_k)
        return self

    def index_options(self) -> dict:
        """What an index backend's search() takes besides the query."""
        return {"k": self.k, "pool": self.pool, "radius": self.radius, "rerank": self.rerank}


@dataclass(frozen=True)
class Query:
    """One or more queries with one set of options: packed codes (m, bits / 8) with optional features (m, D), or
    images (a uint8 array (m, H, W, C), encoded image bytes or PIL images) that the Searcher encodes."""

    codes: np.ndarray | None = None
    features: np.ndarray | None = None
    images: Any = None
    options: SearchOptions = field(default_factory=SearchOptions)

    @classmethod
    def of(cls, *, images, codes, features, k, pool, radius, rerank, label, metadata) -> Query:
        """A query from `search()`'s keyword arguments: exactly one of images and codes; the label as text."""
        if (images is None) == (codes is None):
            raise InvalidInput("search needs exactly one of images= or codes=")
        label = None if label is None else str(label)
        return cls(codes, features, images, SearchOptions(k, pool, radius, rerank, label, metadata))

    def __len__(self) -> int:
        if self.codes is not None:
            return 1 if np.ndim(self.codes) == 1 else len(self.codes)
        if isinstance(self.images, np.ndarray):
            return 1 if self.images.ndim < 4 else len(self.images)
        return len(self.images) if isinstance(self.images, (list, tuple)) else 1


@dataclass(frozen=True)
class Stats:
    """What `stats()` says about a searcher, embedded or remote alike: items, code length, feature size (None: codes
    only), the index's bytes, the model that made the codes (`ModelInfo.to_dict()`, {} without one) and the
    latenthash version answering."""

    count: int
    bits: int
    feature_dim: int | None
    index_bytes: int
    model: dict
    version: str


@runtime_checkable
class SearchAPI(Protocol):
    """What `Searcher`, `Client` and `AsyncClient` (awaited) all offer, with the same arguments and results;
    tests/test_facade.py holds each to it."""

    def search(self, *, images=None, codes=None, features=None, k: int = 10, pool: int | None = None,
               radius: int | None = None, rerank: bool | None = None, label: str | None = None,
               metadata: bool = True) -> SearchResult: ...

    def upsert(self, ids, *, images=None, codes=None, features=None,
               metadata: Sequence[Any] | None = None) -> tuple[int, int]: ...

    def delete(self, ids) -> tuple[int, int]: ...

    def get(self, ids) -> Items: ...

    def stats(self) -> Stats: ...

    def encode(self, images) -> EncodeResult: ...

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None) -> list[DuplicateGroup]: ...
