"""The index seam: what every index backend offers, the result types, and the factory that picks one by URI.

`HashIndex` (embedded, Numba kernels, a directory on disk) and `MilvusIndex` (a Milvus collection, for collections
that outgrow one machine) implement `IndexBackend`; `open_index(uri)` picks one by the URI's scheme (`BACKENDS`),
so callers (Searcher, server, CLI) never name a backend.
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

    def metadata_json(self, ids) -> list[str | None]: ...

    path: Any  # where save() persists to (None: an in-memory index)

    def add(self, ids, codes, features=None, metadata: Sequence[Any] | None = None) -> int: ...

    def remove(self, ids) -> int: ...

    def get(self, ids) -> Items: ...

    def search(self, codes, k: int = 10, *, features=None, pool: int | None = None, radius: int | None = None,
               rerank: bool | None = None) -> SearchResult: ...

    def warmup(self) -> float: ...

    def save(self, path: str | os.PathLike | None = None) -> None: ...

    def stats(self) -> dict: ...


def _open_dir(uri: str, *, bits: int | None = None, feature_dim: int | None = None, create: bool = False,
              **options) -> IndexBackend:
    from pathlib import Path

    from latenthash.errors import ModelMismatch
    from latenthash.index import HashIndex

    path = Path(uri.removeprefix("file://"))
    feature_dtype = options.pop("feature_dtype", "float16")
    if create and not (path / "CURRENT").exists():
        if bits is None:
            raise InvalidInput(f"no index at {path}: pass bits= (and feature_dim=) to create one")
        index = HashIndex(bits=bits, feature_dim=feature_dim, feature_dtype=feature_dtype, path=path)
        index.save(path)
        return index
    index = HashIndex.open(path, **options)
    if bits is not None and bits != index.bits or feature_dim is not None and feature_dim != index.feature_dim:
        raise ModelMismatch(f"the index at {path} holds {index.bits}-bit codes and {index.feature_dim}-d features, "
                            f"not {bits} and {feature_dim}")
    return index


def _open_milvus(uri: str, **options) -> IndexBackend:
    from latenthash.milvus import MilvusIndex

    return MilvusIndex(uri, **options)


BACKENDS: dict[str, Callable[..., IndexBackend]] = {
    "file": _open_dir, "milvus": _open_milvus, "milvus+http": _open_milvus, "milvus+https": _open_milvus,
    "milvus-lite": _open_milvus,
}


def open_index(uri: str | os.PathLike, **options) -> IndexBackend:
    """Open an index named by URI: a directory path (or file://...) opens the embedded `HashIndex`;
    milvus://host:port/collection (or milvus-lite:///file.db/collection) a `MilvusIndex`.

    `bits=` and `feature_dim=` check an existing index (ModelMismatch when they differ); with `create=True` they
    create the index when it does not exist yet. Other options go to the backend."""
    uri = os.fspath(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    try:
        opener = BACKENDS[scheme]
    except KeyError:
        raise InvalidInput(f"no index backend for {scheme}:// URIs; known: {', '.join(BACKENDS)}") from None
    return opener(uri, **options)
