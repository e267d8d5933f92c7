"""The index seam: what every index backend offers, the result types, and the factory that picks one by URI.

`HashIndex` (embedded, Numba kernels, a directory on disk) is the backend today; a distributed one plugs in by
implementing `IndexBackend` and registering a URI scheme in `BACKENDS`, without touching callers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from latenthash.errors import InvalidInput


@dataclass
class SearchResult:
    """Hits of a batch of queries, one row per query, best first; rows shorter than the widest are padded with
    id -1, distance -1 and score NaN (`counts` says how many hits each row has).

    ids: int64 (Q, k); distances: Hamming distances int64 (Q, k); scores: cosine similarity float32 (Q, k) when the
    pool was re-ranked, else None."""

    ids: np.ndarray
    distances: np.ndarray
    counts: np.ndarray
    scores: np.ndarray | None = None
    metadata: list[list[Any]] | None = None  # per query, per hit (filled by Searcher and Client)

    def __len__(self) -> int:
        return len(self.ids)

    def hits(self, query: int = 0) -> list[tuple[int, int, float | None]]:
        """(id, distance, score) triples of one query, without padding."""
        n = int(self.counts[query])
        scores = self.scores[query, :n].tolist() if self.scores is not None else [None] * n
        return list(zip(self.ids[query, :n].tolist(), self.distances[query, :n].tolist(), scores))


@dataclass
class Items:
    """What `get(ids)` returns: the stored codes (packed uint8), features (float32, L2-normalized) and metadata."""

    ids: np.ndarray
    codes: np.ndarray
    features: np.ndarray | None
    metadata: list[Any]


@runtime_checkable
class IndexBackend(Protocol):
    bits: int
    feature_dim: int | None

    def __len__(self) -> int: ...

    def __contains__(self, id_: int) -> bool: ...

    def metadata(self, ids) -> list[Any]: ...

    def add(self, ids, codes, features=None, metadata: Sequence[Any] | None = None) -> None: ...

    def remove(self, ids) -> int: ...

    def get(self, ids) -> Items: ...

    def search(self, codes, k: int = 10, *, features=None, pool: int | None = None, radius: int | None = None,
               rerank: bool | None = None) -> SearchResult: ...

    def radius_counts(self, codes) -> np.ndarray: ...

    def save(self, path: str | os.PathLike | None = None) -> None: ...

    def stats(self) -> dict: ...


def _open_dir(uri: str, **options) -> IndexBackend:
    from latenthash.index import HashIndex

    return HashIndex.open(uri.removeprefix("file://"), **options)


BACKENDS: dict[str, Callable[..., IndexBackend]] = {"file": _open_dir}


def open_index(uri: str | os.PathLike, **options) -> IndexBackend:
    """Open an index named by URI: a directory path (or file://...) opens the embedded `HashIndex`."""
    uri = os.fspath(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    try:
        opener = BACKENDS[scheme]
    except KeyError:
        raise InvalidInput(f"no index backend for {scheme}:// URIs; known: {', '.join(BACKENDS)}") from None
    return opener(uri, **options)
