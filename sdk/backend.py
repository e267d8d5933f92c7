"""The index seam: what every index backend offers, the result types, and the factory that picks one by URI.

`HashIndex` (embedded, Numba kernels, a directory on disk) and `MilvusIndex` (a Milvus collection, for collections
that outgrow one machine) implement `IndexBackend`; `open_index(uri)` picks one by the URI's scheme (`BACKENDS`),
so callers (Searcher, server, CLI) never name a backend.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from latenthash.codes import pack_codes
from latenthash.errors import InvalidInput
from latenthash.limits import MAX_K, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_POOL

# What the public API accepts, in usearch's manner: one query or item, or a batch, as numpy arrays or sequences.
IdsLike = int | Sequence[int] | np.ndarray  # item ids (int64)
CodesLike = Sequence | np.ndarray  # packed uint8 rows (n, bits / 8), or 0/1 or bool bits (n, bits); or one row
FeaturesLike = Sequence | np.ndarray  # float features (n, feature_dim), or one row


class Hit(NamedTuple):
    """One hit: the item's id, its code's Hamming distance to the query, its cosine score (None when the search did
    not re-rank) and its metadata (None when not asked for or none stored)."""

    id: int
    distance: int
    score: float | None
    metadata: Any


@dataclass(repr=False)
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

    def hits(self, query: int = 0) -> list[Hit]:
        """The hits of one query, best first, without padding: (id, distance, score, metadata) rows."""
        n = int(self.counts[query])
        scores = self.scores[query, :n].tolist() if self.scores is not None else [None] * n
        meta = self.metadata[query][:n] if self.metadata is not None else [None] * n
        return [Hit(*row) for row in zip(self.ids[query, :n].tolist(), self.distances[query, :n].tolist(), scores,
                                         meta)]

    def to_list(self) -> list[list[dict]]:
        """Every query's hits as plain dicts (id, distance, score, metadata), for JSON."""
        return [[hit._asdict() for hit in self.hits(q)] for q in range(len(self))]

    def __repr__(self) -> str:
        first = ", ".join(f"{h.id}@{h.distance}" + ("" if h.score is None else f" {h.score:.3f}")
                          for h in self.hits(0)[:5]) if len(self) else ""
        more = " ..." if len(self) and self.counts[0] > 5 else ""
        return (f"SearchResult({len(self)} queries, up to {self.ids.shape[1]} hits each"
                f"{', re-ranked' if self.scores is not None else ''}; query 0: [{first}{more}])")


def padded(ids: np.ndarray, distances: np.ndarray, counts: np.ndarray, scores: np.ndarray | None,
           k: int) -> SearchResult:
    """A result of at most k columns padded to exactly k (-1 / -1 / NaN): every backend's results have the same
    shape for the same call, whatever the index holds."""
    width = ids.shape[1]
    if width == k:
        return SearchResult(ids, distances, counts, scores)
    grow = ((0, 0), (0, k - width))
    return SearchResult(np.pad(ids, grow, constant_values=-1), np.pad(distances, grow, constant_values=-1), counts,
                        None if scores is None else np.pad(scores, grow, constant_values=np.nan))


def from_flat(counts, ids, distances, scores=None, *, width: int | None = None) -> SearchResult:
    """Hits of several queries laid end to end (query i's `counts[i]` hits, best first) -> one result padded to
    `width` columns (default: the most hits any query has, at least one) with -1 / -1 / NaN. The one builder of
    ragged results: remote responses, label filtering and per-query hit lists all come through here."""
    counts = np.asarray(counts, np.int64)
    width = max(int(counts.max(initial=0)), 1) if width is None else width
    valid = np.arange(width) < counts[:, None]
    out_ids = np.full((len(counts), width), -1, np.int64)
    out_d = np.full((len(counts), width), -1, np.int64)
    out_ids[valid], out_d[valid] = ids, distances
    out_s = None
    if scores is not None:
        out_s = np.full((len(counts), width), np.nan, np.float32)
        out_s[valid] = scores
    return SearchResult(out_ids, out_d, counts, out_s)


def from_hits(hits: Sequence[Sequence[tuple]], k: int, scored: bool) -> SearchResult:
    """(id, distance[, score]) tuples per query, best first -> a padded (queries, k) result."""
    rows = [row[:k] for row in hits]
    flat = [hit for row in rows for hit in row]
    return from_flat([len(row) for row in rows], [h[0] for h in flat], [h[1] for h in flat],
                     [h[2] for h in flat] if scored else None, width=k)


@dataclass
class Items:
    """What `get(ids)` returns: the stored codes (packed uint8), features (float32, L2-normalized) and metadata."""

    ids: np.ndarray
    codes: np.ndarray
    features: np.ndarray | None
    metadata: list[Any]


@runtime_checkable
class IndexBackend(Protocol):
    """Everything the Searcher, the server and the CLI use of an index; each backend implements all of it and is run
    through the same conformance tests (tests/test_backends.py)."""

    bits: int
    feature_dim: int | None
    max_k: int  # the most hits one query may ask for (limits.MAX_K, or less where the engine caps it)
    model_info: dict  # the encoder that made the codes (Encoder.info.to_dict()), shown by stats()
    path: Any  # where save() persists to (None: an in-memory index)
    keeps_copies: bool  # whether add() takes copy descriptors (copies=) for copy groups (sdk/copies.py)

    def __len__(self) -> int: ...

    def __contains__(self, id_: int) -> bool: ...

    @property
    def ids(self) -> np.ndarray: ...

    def metadata(self, ids: IdsLike) -> list[Any]: ...

    def metadata_json(self, ids: IdsLike) -> list[str | None]: ...

    def add(self, ids: IdsLike, codes: CodesLike, features: FeaturesLike | None = None,
            metadata: Sequence[Any] | None = None, *, copies: FeaturesLike | None = None) -> int: ...

    def remove(self, ids: IdsLike) -> int: ...

    def get(self, ids: IdsLike) -> Items: ...

    def search(self, codes: CodesLike, k: int = 10, *, features: FeaturesLike | None = None,
               pool: int | None = None, radius: int | None = None,
               rerank: bool | None = None) -> SearchResult: ...

    def warmup(self, *, background: bool = False) -> float: ...  # background: answer searches meanwhile

    def defer_warmup(self) -> None: ...  # answer searches without compiled kernels until warmup() ends

    def save(self, path: str | os.PathLike | None = None) -> Any: ...  # returns where it was saved

    def stats(self) -> dict: ...

    def ping(self, timeout: float = 2.0) -> None: ...  # raises Unavailable when the backend cannot be reached

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ validators
# What every backend checks before anything is stored or searched; the server runs the same checks before it writes
# its log, so whatever it acknowledged can always be applied again.

def check_ids(ids) -> np.ndarray:
    """Caller ids as int64, or InvalidInput."""
    arr = np.atleast_1d(np.asarray(ids))
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InvalidInput(f"ids must be a 1-D sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InvalidInput("ids must fit in a signed 64-bit integer")
    return arr.astype(np.int64)


def check_items(ids, codes, metadata, bits: int) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """What every backend's add() checks: unique int64 ids, packed codes of the right length, one metadata entry
    (checked by `check_metadata`, returned as JSON text) or None per id."""
    ids = check_ids(ids)
    packed = pack_codes(codes, bits)
    n = len(ids)
    if len(packed) != n:
        raise InvalidInput(f"{n} ids but {len(packed)} codes")
    unique, seen = np.unique(ids, return_counts=True)
    if len(unique) != n:
        raise InvalidInput(f"ids must be unique within one add() or Upsert stream (do not repeat an id); repeated: "
                           f"{unique[seen > 1][:10].tolist()}")
    return ids, packed, check_metadata(metadata, n)


def check_metadata(metadata, n: int) -> list[str | None]:
    """One JSON text (or None) per item: standard JSON only (no NaN or infinity), at most MAX_METADATA_BYTES and
    MAX_METADATA_DEPTH levels each; a list with one entry per id (a string is not a list of entries)."""
    if metadata is None:
        return [None] * n
    if isinstance(metadata, (str, bytes, dict)) or not isinstance(metadata, Sequence):
        raise InvalidInput(f"metadata must be a list with one entry per id (or None), got {type(metadata).__name__}")
    if len(metadata) != n:
        raise InvalidInput(f"{n} ids but {len(metadata)} metadata entries")
    out: list[str | None] = []
    for i, m in enumerate(metadata):
        if m is None:
            out.append(None)
            continue
        try:
            text = json.dumps(m, allow_nan=False)
        except RecursionError:
            raise InvalidInput(f"metadata {i} nests deeper than {MAX_METADATA_DEPTH} levels") from None
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"metadata {i} is not standard JSON ({exc}); NaN and infinity are refused") from None
        out.append(_check_json_text(text, i))
    return out


def parse_metadata_json(text: str, i: int = 0):
    """Metadata sent as JSON text (the wire form) -> the value, checked by the same limits before it is parsed
    (a deep nesting would exhaust the parser's recursion)."""
    _check_json_text(text, i)

    def refuse(name):
        raise InvalidInput(f"metadata {i} holds {name}, which is not standard JSON")

    try:
        return json.loads(text, parse_constant=refuse)  # the depth is bounded above, so no RecursionError
    except InvalidInput:
        raise
    except ValueError as exc:
        raise InvalidInput(f"metadata {i} is not valid JSON: {exc}") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_NEST = re.compile(r"[\[\]{}]")


def _check_json_text(text: str, i: int) -> str:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata {i} is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES} "
                           f"(MAX_METADATA_BYTES): keep large data elsewhere and store a reference")
    depth = deepest = 0
    for bracket in _JSON_NEST.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_METADATA_DEPTH:
        raise InvalidInput(f"metadata {i} nests {deepest} levels deep; the limit is {MAX_METADATA_DEPTH}")
    return text


def check_query(codes, features, rerank: bool | None, *, k, radius, pool, bits: int, feature_dim: int | None,
                max_k: int = MAX_K, max_pool: int = MAX_POOL) -> tuple[np.ndarray, np.ndarray | None]:
    """What every backend's search() checks: k, radius and pool in range, the query codes packed, and the query
    features L2-normalized when step 2 (the re-rank) runs, else None."""
    packed, qf = query_rows(codes, features, rerank, k=k, radius=radius, pool=pool, bits=bits,
                            feature_dim=feature_dim, max_k=max_k, max_pool=max_pool)
    return packed, None if qf is None else normalize(qf, "query features")


def query_rows(codes, features, rerank: bool | None, *, k, radius, pool, bits: int, feature_dim: int | None,
               max_k: int = MAX_K, max_pool: int = MAX_POOL) -> tuple[np.ndarray, np.ndarray | None]:
    """`check_query` without the normalization: the query features as float32 rows (Q, feature_dim) as given; a
    caller that normalizes them in a pass of its own must still reject NaN and infinity (`non_finite`)."""
    check_k(k, max_k)
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, np.integer))
                               or not 0 <= radius <= bits):
        raise InvalidInput(f"radius must be an integer from 0 to {bits}, got {radius!r}")
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, (int, np.integer))
                             or not 1 <= pool <= max_pool):
        raise InvalidInput(f"pool must be an integer from 1 to {max_pool}, got {pool!r}")
    packed = pack_codes(codes, bits)
    do_rerank = (features is not None) if rerank is None else bool(rerank)
    if not do_rerank:
        return packed, None
    if features is None:
        raise InvalidInput("rerank=True needs the query features (features=...)")
    if feature_dim is None:
        raise InvalidInput("this index stores no features, so it cannot re-rank: pass rerank=False")
    qf = _float_rows(features, "query features")
    qf = qf[None, :] if qf.ndim == 1 else qf
    if qf.shape != (len(packed), feature_dim):
        raise InvalidInput(f"query features must have shape ({len(packed)}, {feature_dim}), got {qf.shape}")
    return packed, qf


def check_k(k, max_k: int = MAX_K) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
        raise InvalidInput(f"k must be an integer from 1 to {max_k}, got {k!r}")
    return int(k)


def check_features(features, n: int, feature_dim: int | None) -> np.ndarray | None:
    """L2-normalized float32 (n, feature_dim) features, or None for an index without features; else InvalidInput."""
    f = feature_rows(features, n, feature_dim)
    return None if f is None else normalize(f, "features")


def feature_rows(features, n: int, feature_dim: int | None) -> np.ndarray | None:
    """`check_features` without the normalization: contiguous float32 (n, feature_dim) as given, or None; a caller
    that normalizes in a pass of its own must still reject NaN and infinity (`non_finite`)."""
    if features is None:
        if feature_dim:
            raise InvalidInput(f"this index stores {feature_dim}-d features: pass features= with add()")
        return None
    if not feature_dim:
        raise InvalidInput("this index was created without feature_dim: it cannot store features")
    f = _float_rows(features, "features")
    if f.ndim == 1:
        f = f[None, :]
    if f.shape != (n, feature_dim):
        raise InvalidInput(f"features must have shape ({n}, {feature_dim}), got {f.shape}")
    return np.ascontiguousarray(f)


def non_finite(what: str) -> InvalidInput:
    return InvalidInput(f"{what} contain NaN or infinite values")


def _float_rows(values, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be numbers (a float array), got {type(values).__name__}: {exc}") from None
    return arr


def normalize(x: np.ndarray, what: str) -> np.ndarray:
    """Row-wise L2 normalization of float32 rows (zero rows stay zero); InvalidInput naming `what` if any value is
    NaN or infinite. One Numba pass: the numpy version cost ~20 us per query, a tenth of a small index's search."""
    compiled, fallback = _unit_rows()
    rows = np.ascontiguousarray(x, dtype=np.float32)
    # until the kernel is compiled (a fresh install's first seconds), numpy answers instead of waiting for it
    unit, finite = (compiled if compiled.overloads else fallback)(rows)
    if not finite:
        raise non_finite(what)
    return unit


@functools.cache
def _unit_rows():
    """(the compiled row normalizer, numpy's): imported at the first call, as numba is heavy to import, and once
    (an import statement in a query's path costs a module lookup every call)."""
    from latenthash import kernels, numpy_search

    return kernels.unit_rows, numpy_search.unit_rows


def _open_dir(uri: str, *, bits: int | None = None, feature_dim: int | None = None, create: bool = False,
              **options) -> IndexBackend:
    from latenthash.errors import ModelMismatch
    from latenthash.index import HashIndex

    path = index_directory(uri)
    assert path is not None  # BACKENDS sends only directory URIs here
    feature_dtype = options.pop("feature_dtype", "float16")
    save_new = options.pop("save_new", True)
    if create and not saved_index_at(path):
        if bits is None:
            raise InvalidInput(f"no index at {path}: pass bits= (and feature_dim=) to create one")
        index = HashIndex(bits=bits, feature_dim=feature_dim, feature_dtype=feature_dtype, path=path)
        if save_new:
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


def parse_uri(uri: str) -> dict:
    """Split a milvus:// or milvus-lite:// URI into the client URI, the collection and the options (the one
    place index URIs are parsed, with `uri_scheme` below)."""
    parts = urlsplit(uri)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "milvus-lite":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        db, _, collection = path.rstrip("/").rpartition("/")
        if not db.endswith(".db"):
            raise InvalidInput(f"milvus-lite URI must look like milvus-lite:///path/file.db/collection, got {uri!r}")
        return {"client_uri": db, "collection": collection, "options": options, "lite": True}
    if parts.scheme in ("milvus", "milvus+http", "milvus+https"):
        collection = parts.path.strip("/")
        if not parts.hostname or not collection or "/" in collection:
            raise InvalidInput(f"Milvus URI must look like milvus://host:19530/collection, got {uri!r}")
        http = "https" if parts.scheme == "milvus+https" else "http"
        return {"client_uri": f"{http}://{parts.hostname}:{parts.port or 19530}", "collection": collection,
                "options": options, "lite": False}
    raise InvalidInput(f"not a Milvus URI: {uri!r}")


def uri_scheme(uri: str | os.PathLike) -> str:
    """The backend scheme of an index URI: 'file' for a plain path; InvalidInput for an unknown scheme."""
    uri = os.fspath(uri)
    scheme = urlsplit(uri).scheme if "://" in uri else "file"
    if scheme not in BACKENDS:
        raise InvalidInput(f"no index backend for {scheme}:// URIs; known: {', '.join(BACKENDS)}")
    return scheme


def index_directory(uri: str | os.PathLike) -> Path | None:
    """The directory of an embedded index (a path or file://path); None for an index that lives elsewhere."""
    uri = os.fspath(uri)
    return Path(uri.removeprefix("file://")) if uri_scheme(uri) == "file" else None


def saved_index_at(uri: str | os.PathLike) -> bool:
    """Whether a directory URI holds a saved index (its CURRENT file); False for URIs of other backends, whose
    collections are created or found when opened. The one "is there an index here?" check."""
    root = index_directory(uri)
    return root is not None and (root / "CURRENT").exists()


def open_index(uri: str | os.PathLike, **options) -> IndexBackend:
    """Open an index named by URI: a directory path (or file://...) opens the embedded `HashIndex`;
    milvus://host:port/collection (or milvus-lite:///file.db/collection) a `MilvusIndex`.

    `bits=` and `feature_dim=` check an existing index (ModelMismatch when they differ); with `create=True` they
    create the index when it does not exist yet (a directory index is saved at once unless `save_new=False`: then
    its first save() writes it, so an interrupted first run leaves none). Other options go to the backend."""
    return BACKENDS[uri_scheme(uri)](os.fspath(uri), **options)
