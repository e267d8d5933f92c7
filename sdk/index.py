# mypy: disable-error-code="index"
# (features and scales are Optional arrays whose presence one snapshot field implies for another: mypy cannot
# follow that invariant)
"""`HashIndex`: the embedded index of codes, features, ids and metadata, searched by the Numba kernels.

Concurrency: the arrays live in a `_Snapshot` that searches read without locks. Adds append into spare capacity past
the snapshot's count and then publish a new snapshot, so a search running meanwhile never sees a half-written item;
removals (and re-adds of an existing id, which replace the old item) build compacted copies and publish them.
Writers are serialized by a lock. Rows keep insertion order, and Hamming ties are broken by that order.

On disk (`save(dir)`): `dir/CURRENT` names a generation folder `dir/gen-N/` holding `header.json` (format version,
bits, feature dim and dtype, count, sha256 of every file) and the arrays as `.npy` files, which `open` memory-maps.
A save writes a new generation, fsyncs it, then atomically replaces `CURRENT`: a crash midway leaves the previous
generation readable. Older generations are removed after the switch.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latenthash import numpy_search
from latenthash.backend import (
    CodesLike,
    FeaturesLike,
    IdsLike,
    Items,
    SearchResult,
    check_features,
    check_ids,
    check_items,
    feature_rows,
    non_finite,
    normalize,
    padded,
    query_rows,
)
from latenthash.buckets import SHELL_WIDEN, SKETCH_BITS, BucketCache, sketch_flips
from latenthash.codes import check_bits, from_words, n_bytes, n_words, pack_codes, to_words
from latenthash.copies import check_copies, copies_path, copy_groups, copy_index, open_copies, sign_codes
from latenthash.dedup import DuplicateGroup, find_duplicates
from latenthash.errors import IndexCorrupt, InvalidInput, NotFound, storage_error
from latenthash.generations import read_generation, write_generation
from latenthash.limits import COPY_FLOOR, COPY_MARGINS, DEDUP_MIN_SCORE, DEDUP_RADIUS, MAX_K, MAX_POOL, pool_size
from latenthash.storage import DirLock

FEATURE_DTYPES = ("float32", "float16", "int8")
SCALED_DTYPES = ("float16", "int8")  # stored with a per-row scale (`_row_scales`) ...
SCALE_CHUNK = 1 << 16  # ... computed this many rows at a time (a float32 copy of each chunk)
_UINT8, _FLOAT32 = np.dtype(np.uint8), np.dtype(np.float32)  # dtypes are singletons: `_one_query` tests identity
OVERSAMPLE = 20  # candidates per hit that step 2 re-scores exactly after its sketch pass, at the least ...
SMALL_POOL_SHARE, SMALL_POOL_CAP = 10, 30  # ... or a tenth of the pool up to 30 per hit ...
RESCORE_SHARE = 20  # ... or this share of the pool (1 / RESCORE_SHARE), whichever is most


@dataclass(frozen=True)
class _Snapshot:
    n: int
    words: np.ndarray  # (capacity, W) uint64
    ids: np.ndarray  # (capacity,) int64
    features: np.ndarray | None  # (capacity, D) float32 / float16 / int8
    scales: np.ndarray | None  # (capacity,) float32 per-row scale, int8 and float16 storage (see `_row_scales`)
    metadata: list  # JSON text (str) or None per row; rows past n may exist

    @functools.cached_property
    def flat(self) -> np.ndarray:
        """The n stored codes' words as one flat array, as the scan kernels take them (made once per snapshot)."""
        return self.words[: self.n].reshape(-1)

    @functools.cached_property
    def kernel_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, scales, ids) as the re-scoring kernels take them (`kernels.rerank_args`; made once per
        snapshot)."""
        return (*_kernels().rerank_args(self.features, self.scales), self.ids)


def _rescored(k: int, target: int) -> int:
    """How many of a bucketed pool's rows, nearest by sketch, step 2 re-scores exactly. A pool of a few thousand
    loses more of the true neighbours to the sketch's error than to its cut, so it re-scores a tenth of itself; a
    large pool (a large index) is held back by its cut instead, and a twentieth of it serves (RESULTS.md has both)."""
    return max(OVERSAMPLE * k, min(target // SMALL_POOL_SHARE, SMALL_POOL_CAP * k), target // RESCORE_SHARE)


def _compiled_form(a: np.ndarray) -> np.ndarray:
    """`a` as the kernels are compiled for it: contiguous, aligned and writable (a read-only array, such as one
    decoded off the wire, is another type to Numba, which would compile the kernel again on the query's path)."""
    f = a.flags
    return a if f.c_contiguous and f.aligned and f.writeable else a.copy()


def _row_scales(stored: np.ndarray) -> np.ndarray:
    """1 / the norm of each stored (rounded) feature row, so that row x scale is a unit vector and a dot product
    with it an exact cosine of what is stored. Rounding moves a row's norm by about as much as neighbours' scores
    differ near the k-th place, so scores without it rank by that noise (benchmarks/RESULTS.md measures it)."""
    if stored.dtype == np.float16 and _kernels().half_row_scales.overloads:  # compiled (warmup): one pass
        return _kernels().half_row_scales(stored.view(np.uint16))
    out = np.ones(len(stored), np.float32)
    for lo in range(0, len(stored), SCALE_CHUNK):
        x = stored[lo:lo + SCALE_CHUNK].astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        np.divide(1.0, norms, out=out[lo:lo + SCALE_CHUNK], where=norms > 0)
    return out


@functools.cache
def _kernels():
    from latenthash import kernels  # lazy: numba is heavy to import (cached: an import statement costs a search)

    return kernels


class HashIndex:
    """Packed binary codes with optional features and metadata, searchable by Hamming distance and cosine re-rank.

    >>> index = HashIndex(bits=48, feature_dim=256)
    >>> index.add([7, 8], codes, features, metadata=[{"path": "a.jpg"}, {"path": "b.jpg"}])
    >>> result = index.search(query_codes, k=10, features=query_features)  # result.ids: (queries, 10)

    Ids are caller-chosen 64-bit integers; adding an id that is already present replaces its item (it then ranks
    as the newest item in ties)."""

    keeps_copies = True

    def __init__(self, *, bits: int, feature_dim: int | None = None, feature_dtype: str = "float16",
                 path: str | os.PathLike | None = None):
        self.bits = check_bits(bits)
        if feature_dim is not None and (not isinstance(feature_dim, (int, np.integer)) or feature_dim < 1):
            raise InvalidInput(f"feature_dim must be a positive integer or None, got {feature_dim!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise InvalidInput(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        self.feature_dim = int(feature_dim) if feature_dim is not None else None
        self.feature_dtype = feature_dtype
        self.path = Path(path) if path is not None else None
        self._lock = threading.RLock()
        self._rows: dict[int, int] = {}
        self._snap = self._empty_snapshot(0)
        self._buckets = BucketCache()
        # writeable flags of the arrays whose kernels are not compiled yet (warmup(background=True) or
        # defer_warmup() until warmup() ends): searches of such snapshots are answered by numpy_search
        self._pending: frozenset[bool] = frozenset()
        self._warmer: threading.Thread | None = None
        self.model_info: dict = {}  # free-form description of the encoder that made the codes (saved in header)
        self.max_k = MAX_K
        self.copies: HashIndex | None = None  # the copy descriptors' index beside this one (copies.py), once any
        self._code_shape, self._feature_shape = (n_bytes(self.bits),), (self.feature_dim,)  # of `_one_query`

    # ------------------------------------------------------------------------------------------------ storage
    def _empty_snapshot(self, capacity: int) -> _Snapshot:
        w = n_words(self.bits)
        feats = scales = None
        if self.feature_dim:
            feats = np.zeros((capacity, self.feature_dim), dtype=self.feature_dtype)
            if self.feature_dtype in SCALED_DTYPES:
                scales = np.ones(capacity, dtype=np.float32)
        return _Snapshot(0, np.zeros((capacity, w), np.uint64), np.zeros(capacity, np.int64), feats, scales, [])

    def _grown(self, snap: _Snapshot, need: int) -> _Snapshot:
        """A snapshot with room for `need` rows: the same arrays if they fit, else copies with doubled capacity."""
        if need <= len(snap.ids) and snap.words.flags.writeable:
            return snap
        bigger = self._empty_snapshot(max(need, 2 * len(snap.ids), 1024))
        n = snap.n
        bigger.words[:n] = snap.words[:n]
        bigger.ids[:n] = snap.ids[:n]
        if bigger.features is not None:
            bigger.features[:n] = snap.features[:n]
        if bigger.scales is not None:
            bigger.scales[:n] = snap.scales[:n]
        return _Snapshot(n, bigger.words, bigger.ids, bigger.features, bigger.scales, list(snap.metadata[:n]))

    def __len__(self) -> int:
        return self._snap.n

    def __contains__(self, id_: int) -> bool:
        return int(id_) in self._rows

    @property
    def ids(self) -> np.ndarray:
        snap = self._snap
        return snap.ids[: snap.n].copy()

    # ------------------------------------------------------------------------------------------------ input checks
    def _prepare_features(self, features, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The rows and row scales to store (see `_row_scales`), checked and normalized."""
        K = _kernels()
        if self.feature_dtype == "float16" and K.unit_half_rows.overloads:  # compiled (warmup): one pass
            f = feature_rows(features, n, self.feature_dim)
            if f is None:
                return None, None
            bits, scales, finite = K.unit_half_rows(f)
            if not finite:
                raise non_finite("features")
            return bits.view(np.float16), scales
        f = check_features(features, n, self.feature_dim)
        if f is None:
            return None, None
        if self.feature_dtype == "int8":
            stored = np.round(f * (127.0 / np.maximum(np.abs(f).max(axis=1), 1e-12))[:, None]).astype(np.int8)
        elif self.feature_dtype == "float16":  # numpy until the kernel is compiled
            stored = f.astype(np.float16)
        else:
            return f, None
        return stored, _row_scales(stored)

    # ------------------------------------------------------------------------------------------------ writes
    def add(self, ids: IdsLike, codes: CodesLike, features: FeaturesLike | None = None,
            metadata: Sequence[Any] | None = None, *, copies: FeaturesLike | None = None) -> int:
        """Add items; an id already present is replaced. codes: packed uint8 (N, ceil(bits/8)) or 0/1 (N, bits).
        `copies`: the items' copy descriptors (`Encoder.describe_copies`), kept in the copy index beside this one
        (copies.py); an item added without one (or with a zero row) has none, a replaced item's old one dropped.
        Returns how many of the ids were already present (replaced)."""
        ids, packed, meta = check_items(ids, codes, metadata, self.bits)
        n = len(ids)
        feats, scales = self._prepare_features(features, n)
        described = None if copies is None else check_copies(copies, n, getattr(self.copies, "feature_dim", None))
        if n == 0:
            return 0
        with self._lock:
            self._add_copies(ids, described)
            listed = ids.tolist()
            present = [i for i in listed if i in self._rows] if self._rows else []
            if present:
                self._remove_locked(np.asarray(present, dtype=np.int64))
            snap = self._grown(self._snap, self._snap.n + n)
            lo, hi = snap.n, snap.n + n
            snap.words[lo:hi] = to_words(packed, self.bits)
            snap.ids[lo:hi] = ids
            if feats is not None:
                snap.features[lo:hi] = feats
            if scales is not None:
                snap.scales[lo:hi] = scales
            del snap.metadata[lo:]
            snap.metadata.extend(meta)
            self._rows.update(zip(listed, range(lo, hi)))
            self._snap = _Snapshot(hi, snap.words, snap.ids, snap.features, snap.scales, snap.metadata)
        return len(present)

    def _add_copies(self, ids: np.ndarray, described: np.ndarray | None) -> None:
        """Keep the items' copy descriptors; items without one (None, or a zero row) lose any they had."""
        has = np.zeros(len(ids), bool) if described is None else described.any(axis=1)
        if described is not None and self.copies is None:
            self.copies = copy_index(described.shape[1])
        if self.copies is None:
            return
        if not has.all():
            self.copies.remove(ids[~has])
        if has.any():
            self.copies.add(ids[has], sign_codes(described[has]), described[has])

    def remove(self, ids: IdsLike) -> int:
        """Remove items by id; returns how many were present (unknown ids are ignored)."""
        ids = check_ids(ids)
        with self._lock:
            if self.copies is not None:
                self.copies.remove(ids)
            return self._remove_locked(ids)

    def _remove_locked(self, ids: np.ndarray) -> int:
        rows = [self._rows[i] for i in ids.tolist() if i in self._rows]
        if not rows:
            return 0
        snap = self._snap
        keep = np.ones(snap.n, bool)
        keep[rows] = False
        cap = max(1024, len(snap.ids))
        new = self._empty_snapshot(cap)
        m = int(keep.sum())
        new.words[:m] = snap.words[: snap.n][keep]
        new.ids[:m] = snap.ids[: snap.n][keep]
        if new.features is not None:
            new.features[:m] = snap.features[: snap.n][keep]
        if new.scales is not None:
            new.scales[:m] = snap.scales[: snap.n][keep]
        meta = [snap.metadata[r] for r in np.flatnonzero(keep).tolist()]
        self._rows = {i: r for r, i in enumerate(new.ids[:m].tolist())}
        self._snap = _Snapshot(m, new.words, new.ids, new.features, new.scales, meta)
        return len(rows)

    # ------------------------------------------------------------------------------------------------ reads
    def get(self, ids: IdsLike) -> Items:
        """Stored codes, features and metadata of the given ids, in the order given; NotFound names missing ids."""
        ids = check_ids(ids)
        with self._lock:
            snap = self._snap
            missing = [i for i in ids.tolist() if i not in self._rows]
            if missing:
                raise NotFound(f"ids not in the index: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            rows = np.asarray([self._rows[i] for i in ids.tolist()], dtype=np.int64)
        feats = self._float_features(snap, rows) if snap.features is not None else None
        meta = [None if snap.metadata[r] is None else json.loads(snap.metadata[r]) for r in rows.tolist()]
        return Items(ids, from_words(snap.words[rows], self.bits), feats, meta)

    def metadata(self, ids: IdsLike) -> list[Any]:
        """Metadata of the given ids (None for unknown ids, e.g. the -1 padding of a search result)."""
        try:
            return [None if text is None else json.loads(text) for text in self.metadata_json(ids)]
        except ValueError as exc:  # stored texts are checked JSON: one that does not parse was damaged on disk
            raise IndexCorrupt(f"stored metadata does not parse ({exc}): the index's metadata.bin is damaged; run "
                               f"latenthash verify, then restore or rebuild the index") from None

    def metadata_json(self, ids: IdsLike) -> list[str | None]:
        """The same as JSON text, as stored: what a server sends on without decoding and encoding it again."""
        snap = self._snap
        rows = self._rows
        out = []
        for i in np.asarray(ids).ravel().tolist():
            r = rows.get(i)
            out.append(snap.metadata[r] if r is not None and r < snap.n else None)
        return out

    @staticmethod
    def _float_features(snap: _Snapshot, rows: np.ndarray) -> np.ndarray:
        f = snap.features[rows].astype(np.float32)
        return f * snap.scales[rows, None] if snap.scales is not None else f

    def _query_words(self, codes) -> np.ndarray:
        return to_words(pack_codes(codes, self.bits), self.bits)

    def search(self, codes: CodesLike, k: int = 10, *, features: FeaturesLike | None = None,
               pool: int | None = None, radius: int | None = None,
               rerank: bool | None = None, threads: int | None = None) -> SearchResult:
        """Two-step search for one query code or a batch.

        Step 1 takes the Hamming candidate pool by distance: every item at distance <= d*, the smallest distance at
        which at least `pool` items are covered (default `limits.pool_size`): whole distance shells, so a tie at the
        boundary is never cut by storage order; or every item within `radius`. A large index with features (over
        buckets.MIN_ROWS items, codes collapsed) widens those shells and cuts them back to about `pool` items by
        the cells nearest the query (k-means cells inside each code's bucket; see buckets.py). Step 2 (when
        `features` are given and the index stores features; `rerank=False` skips it) re-ranks the pool by cosine
        similarity and keeps the best k (a large index first ranks its pool by feature sketches, and re-scores
        exactly the nearest max(20 k, min(pool / 10, 30 k), pool / 20): `_rescored`). `pool` is the knob that trades
        recall for speed (docs/usage.md has its curve).
        Without step 2, the result is the exact Hamming top-k (or, with `radius`, every code within it, nearest
        first, at most k)."""
        if radius is None and rerank is None and threads is None and not self._pending:
            found = self._one_query(codes, features, k, pool)
            if found is not None:
                return found
        packed, raw = query_rows(codes, features, rerank, k=k, radius=radius, pool=pool, bits=self.bits,
                                 feature_dim=self.feature_dim)
        if threads is not None:
            _kernels().set_threads(threads)
        snap = self._snap  # one consistent view for the whole call
        target = pool_size(k, pool)
        compiling = bool(snap.words.flags.writeable) in self._pending  # answer without the kernels meanwhile
        if raw is not None and radius is None and len(packed) == 1 and not compiling:
            found = self._twostep_one(snap, packed[0], raw[0], target, k)
            if found is not None:
                return found
        qf = None if raw is None else normalize(raw, "query features")
        qw = to_words(packed, self.bits)
        do_rerank = qf is not None
        if not len(qw):
            empty = np.zeros((0, k), np.int64)
            return SearchResult(empty, empty.copy(), np.zeros(0, np.int64),
                                np.zeros((0, k), np.float32) if do_rerank else None)
        if compiling:
            return padded(*numpy_search.search(snap.words, snap.ids[: snap.n], snap.features, snap.scales, qw, qf,
                                               k=k, radius=radius, target=target, bits=self.bits), k)
        if qf is None:
            if radius is None and len(qw) == 1 and self._buckets.get(snap) is None:
                K = _kernels()
                return SearchResult(*K.topk_one(snap.flat, snap.n, qw.shape[1], qw[0], k, self.bits,
                                                K.single_chunks(snap.n), snap.ids))
            if radius is None:
                rows, dists, counts = self._topk_rows(snap, qw, k)
            else:
                rows, dists, counts = self._radius_rows(snap, qw, radius, k)
            held = int(counts[0]) if len(counts) == 1 else counts.min()  # one query: no reduction to launch
            if rows.shape[1] == k and held == k:  # no padding to keep
                return SearchResult(snap.ids[rows], dists, counts)
            ids = np.where(rows >= 0, snap.ids[np.maximum(rows, 0)], -1) if snap.n else rows
            return padded(ids, dists, counts, None, k)
        if radius is not None:
            rows, dists, counts = self._radius_rows(snap, qw, radius, target)
        else:
            buckets = self._buckets.get(snap)
            if buckets is not None and buckets.signs is not None:
                rows, dists, counts = self._shell_candidates(buckets, qw, qf, target, k)
            else:
                rows, dists, counts = self._shell_rows(snap, qw, target)
        pos, scores = self._rerank(snap, qf, rows, counts, k)
        return SearchResult(*_kernels().take_hits(pos, rows, dists, snap.ids), scores)

    def _one_query(self, codes, features, k, pool) -> SearchResult | None:
        """The common query, without the general path's conversions: one packed code (uint8) and its float32
        features, k and pool plain ints in range, over a bucketed index (`_twostep_one`); None for any other form,
        which the general path converts, or rejects with the reason."""
        if (type(codes) is not np.ndarray or codes.dtype is not _UINT8 or codes.shape != self._code_shape
                or type(features) is not np.ndarray or features.dtype is not _FLOAT32
                or features.shape != self._feature_shape or type(k) is not int or not 0 < k <= MAX_K
                or not (pool is None or type(pool) is int and 0 < pool <= MAX_POOL)
                or self.bits % 8 and codes[-1] & ((1 << (8 - self.bits % 8)) - 1)):
            return None
        return self._twostep_one(self._snap, codes, features, pool_size(k, pool), k)

    def _twostep_one(self, snap: _Snapshot, code: np.ndarray, features: np.ndarray, target: int,
                     k: int) -> SearchResult | None:
        """One query's two steps over a bucketed index in one compiled call, which takes the packed code and the
        features as given (it makes the words and normalizes); None where the snapshot has no buckets yet. In a
        small index the Python around one query costs about as much as its first step (RESULTS.md)."""
        buckets = self._buckets.get(snap)
        if buckets is None or buckets.signs is None:
            return None
        K = _kernels()
        ids, dists, scores, counts = K.twostep_one(
            *buckets.kernel_layout, buckets.centre, buckets.flips, buckets.cell_rows, *snap.kernel_rows,
            _compiled_form(code), _compiled_form(features), SHELL_WIDEN * target, target, self.bits,
            _rescored(k, target), k, K.one_query_parts())
        if counts[0] < 0:
            raise non_finite("query features")
        return SearchResult(ids, dists, counts, scores)

    def _shell_rows(self, snap: _Snapshot, qw: np.ndarray, target: int):
        """Step 1 by scan: every row at distance <= d*, the smallest distance that reaches `target` rows (whole
        distance shells: a tie at the boundary is never cut by storage order), nearest first."""
        covered = np.cumsum(self._radius_counts(snap, qw), axis=1)  # rows within distance d, d = 0..bits
        need = covered[np.arange(len(qw)), np.argmax(covered >= min(target, snap.n), axis=1)]
        rows, dists, counts = self._topk_rows(snap, qw, max(1, int(need.max())))
        return rows, dists, np.minimum(counts, need)

    def _shell_candidates(self, buckets, qw: np.ndarray, qf: np.ndarray, target: int, k: int):
        """Step 1 by buckets (whole distance shells covering SHELL_WIDEN x target rows, cut by their cells nearest
        the query to about `target`; see buckets.py); of that pool, the rows nearest the query by feature sketch go
        on to the exact re-score: `_rescored(k, target)`."""
        K = _kernels()
        pos, dists, counts = K.twostep_candidates(*buckets.kernel_layout, qw.reshape(-1), qf, buckets.centre,
                                                  buckets.flips, np.int64(SHELL_WIDEN * target), np.int64(target),
                                                  self.bits, np.int64(_rescored(k, target)))
        return np.where(pos >= 0, buckets.cell_rows[np.maximum(pos, 0)], -1), dists, counts

    def _radius_counts(self, snap: _Snapshot, qw: np.ndarray) -> np.ndarray:
        """Rows of the snapshot at each distance 0..bits from each query word row: int64 (Q, bits + 1)."""
        return _kernels().radius_counts(snap.flat, snap.n, qw.shape[1], qw.reshape(-1),
                                        self.bits)

    @staticmethod
    def _rerank(snap: _Snapshot, qf: np.ndarray, rows: np.ndarray, counts: np.ndarray, k: int):
        K = _kernels()
        feats, scales = K.rerank_args(snap.features, snap.scales)
        return K.cosine_rerank(qf, feats, scales, rows, counts, np.int64(k))

    def _topk_rows(self, snap: _Snapshot, qw: np.ndarray, k: int):
        K = _kernels()
        n, w = snap.n, qw.shape[1]
        k_eff = min(k, max(n, 1))
        buckets = self._buckets.get(snap)
        if buckets is not None:  # learned codes collapse onto few codewords: search those instead of every row
            return K.topk_buckets(buckets.codes.reshape(-1), len(buckets.codes), w, buckets.offsets, buckets.rows,
                                  qw.reshape(-1), k_eff, self.bits, max(1, min(len(qw), 4 * K.threads())))
        flat = snap.flat
        if len(qw) == 1:
            return K.topk_single(flat, n, w, qw[0], k_eff, self.bits, K.single_chunks(n))
        rows, dists = K.topk_batch(flat, n, w, qw.reshape(-1), k_eff, self.bits, max(1, min(len(qw), 4 * K.threads())))
        return rows, dists, (rows >= 0).sum(1)

    def _radius_rows(self, snap: _Snapshot, qw: np.ndarray, radius: int, limit: int):
        K = _kernels()
        n, w = snap.n, qw.shape[1]
        flat, qflat = snap.flat, qw.reshape(-1)
        hist = K.radius_counts(flat, n, w, qflat, self.bits)
        counts = np.minimum(hist[:, : radius + 1].sum(1), limit)
        offsets, found, ids, dists = K.radius_search(flat, n, w, qflat, np.int64(radius), counts.astype(np.int64))
        width = max(1, int(found.max(initial=0)))
        rows = np.full((len(qw), width), -1, np.int64)
        out_d = np.full((len(qw), width), -1, np.int64)
        for i in range(len(qw)):
            rows[i, : found[i]] = ids[offsets[i]: offsets[i] + found[i]]
            out_d[i, : found[i]] = dists[offsets[i]: offsets[i] + found[i]]
        return rows, out_d, found

    def duplicates(self, *, radius: int | None = None, min_score: float | None = None,
                   margins: Sequence[float] | None = None, floor: float | None = None,
                   progress: bool = False) -> list[DuplicateGroup]:
        """Groups of near-duplicates, largest first. Where this index keeps copy descriptors and neither `radius`
        nor `min_score` is given: groups of copies by them (copies.py; `margins` for groups of 2, 3, 4, `floor` the
        cosine every link inside reaches). Otherwise
        items within Hamming `radius` whose features' cosine is at least `min_score`, grouped transitively
        (dedup.py; an index without features groups by codes alone). Defaults in limits.py."""
        if self.copies is not None and radius is None and min_score is None:
            return copy_groups(self.copies, margins=COPY_MARGINS if margins is None else margins,
                               floor=COPY_FLOOR if floor is None else floor, progress=progress)
        if margins is not None or floor is not None:
            raise InvalidInput("margins and floor apply to copy groups, which need copy descriptors in the index "
                               "(index with a model that has a copy head) and no radius or min_score")
        snap = self._snap
        return find_duplicates(snap.words[: snap.n], snap.features, snap.scales, snap.ids[: snap.n], bits=self.bits,
                               radius=DEDUP_RADIUS if radius is None else radius,
                               min_score=DEDUP_MIN_SCORE if min_score is None else min_score, progress=progress)

    def radius_counts(self, codes) -> np.ndarray:
        """How many items lie at each Hamming distance 0..bits from each query: int64 (Q, bits + 1)."""
        return self._radius_counts(self._snap, self._query_words(codes))

    def warmup(self, *, background: bool = False) -> float:
        """Compile (or load from Numba's cache) the kernels for this index's array types; returns the seconds.

        Compiles on one-row copies of the storage (same dtypes and read-only flags as memory-mapped arrays, and the
        writable ones a memory-mapped index's first write brings), so it never reads the index's own files; then
        groups a large index's rows by code (see buckets.py). `background=True` returns at once and compiles in a
        thread while searches are answered by `numpy_search` (no compilation). A server opens its index so (the
        compiling starts at once), calls `defer_warmup()` after its log replay, starts serving, then calls
        `warmup()` in the thread that started it. Measured on the main job's service rate: with the background
        thread alone, or with the serving thread alone on a cold cache, later searches ran at about half speed;
        with both, at full speed, cold or warm (the cause inside Numba's threading layer was not found)."""
        snap = self._snap
        variants = self._variants(snap)
        if background:
            self._pending = frozenset(variants)
            self._warmer = threading.Thread(target=self._warm, args=(snap, variants), name="latenthash-warmup",
                                            daemon=True)
            self._warmer.start()
            return 0.0
        t0 = time.perf_counter()
        self._warm(snap, variants)
        return time.perf_counter() - t0

    def defer_warmup(self) -> None:
        """Answer searches through `numpy_search` (exact, nothing to compile) until the next `warmup()` ends."""
        self._pending = frozenset(self._variants(self._snap))

    def warmed(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for a background warmup (kernels compiled, rows grouped by code); True once
        none is running. Searches need not wait: this is for measuring the index as a long-running one is."""
        if self._warmer is not None:
            self._warmer.join(timeout)
        return self._warmer is None or not self._warmer.is_alive()

    @staticmethod
    def _variants(snap: _Snapshot) -> tuple[bool, ...]:
        """The writeable flags of the arrays to compile for: this snapshot's first, then the writable copies that
        a memory-mapped index's first write makes."""
        return tuple(dict.fromkeys((bool(snap.words.flags.writeable), True)))

    def _warm(self, snap: _Snapshot, variants: tuple[bool, ...]) -> None:
        try:
            for writeable in variants:
                self._compile(snap, writeable)
                self._pending = self._pending - {writeable}  # snapshots of these arrays use the kernels from now
            self._buckets.warm(self._snap)
        finally:
            self._pending = frozenset()

    def _compile(self, snap: _Snapshot, writeable: bool) -> None:
        """Run every kernel of the query path once on one-row arrays like `snap`'s (Numba compiles per dtype,
        layout and read-only flag)."""
        dummy = _Snapshot(1, _like(snap.words, writeable), _like(snap.ids, writeable),
                          None if snap.features is None else _like(snap.features, writeable),
                          None if snap.scales is None else _like(snap.scales, writeable), [None])
        qw = np.zeros((2, dummy.words.shape[1]), np.uint64)
        self._topk_rows(dummy, qw[:1], 1)
        K = _kernels()
        # the parallel path of indexes over 64k rows
        K.topk_single(dummy.words[:1].reshape(-1), 1, qw.shape[1], qw[0], 1, self.bits, 2)
        K.topk_one(dummy.flat, 1, qw.shape[1], qw[0], 1, self.bits, 1, dummy.ids)
        rows, _, counts = self._topk_rows(dummy, qw, 1)
        self._radius_rows(dummy, qw[:1], 0, 1)
        for blocks in (1, 2):  # one query runs serially, a batch in parallel: compile both
            K.topk_buckets(np.zeros(qw.shape[1], np.uint64), 1, qw.shape[1], np.array([0, 1], np.int64),
                           np.zeros(1, np.int64), qw.reshape(-1), 1, self.bits, blocks)
        if dummy.features is not None:
            K.unit_rows(np.zeros((2, int(dummy.features.shape[1])), np.float32))  # normalize() uses it once compiled
            K.unit_half_rows(np.zeros((2, int(dummy.features.shape[1])), np.float32))  # add() of float16 rows ...
            K.half_row_scales(np.zeros((2, int(dummy.features.shape[1])), np.uint16))  # ... and their scales on open
            qf = normalize(np.zeros((2, int(dummy.features.shape[1])), np.float32), "features")
            pos, _ = self._rerank(dummy, qf, rows, counts, 1)
            K.take_hits(pos, rows, rows, dummy.ids)
            # the two steps of bucketed indexes: a batch (see _shell_candidates), one query (twostep_one)
            dim = int(dummy.features.shape[1])
            one = np.array([0, 1], np.int64)
            layout = (np.zeros(qw.shape[1], np.uint64), 1, qw.shape[1], np.array([1 << 32 | 1], np.int64), one, one,
                      np.zeros((1, dim), np.uint16),
                      np.zeros((1, SKETCH_BITS // 64, 8), np.uint64))
            centre, flips = np.zeros(dim, np.float32), sketch_flips(dim)
            K.twostep_candidates(*layout, qw.reshape(-1), qf, centre, flips, np.int64(1), np.int64(1), self.bits,
                                 np.int64(1))
            K.twostep_one(*layout, centre, flips, one[:1], *dummy.kernel_rows, np.zeros(qw.shape[1] * 8, np.uint8),
                          np.zeros(dim, np.float32), np.int64(1), np.int64(1), self.bits, np.int64(1), np.int64(1), 2)
            K.launch_cost()  # its kernel compiled (or loaded) here, not on the first query's path

    def stats(self) -> dict:
        snap = self._snap
        n = snap.n
        nbytes = n * snap.words.shape[1] * 8 + n * 8
        if snap.features is not None:
            nbytes += n * snap.features.shape[1] * snap.features.itemsize
        if snap.scales is not None:
            nbytes += n * 4
        nbytes += sum(len(m) for m in snap.metadata[:n] if m)
        return {"count": n, "bits": self.bits, "feature_dim": self.feature_dim, "feature_dtype": self.feature_dtype,
                "index_bytes": int(nbytes), "bytes_per_item": nbytes / n if n else 0.0,
                "path": str(self.path) if self.path else None, "model": self.model_info,
                "described_copies": len(self.copies) if self.copies is not None else 0}

    # ------------------------------------------------------------------------------------------------ persistence
    def ping(self, timeout: float = 2.0) -> None:
        """An embedded index is always there (the Protocol's liveness check, for backends behind a network)."""

    def close(self) -> None:
        """Nothing to release: the arrays are plain or memory-mapped and go with the object (the Protocol's close
        is for backends that hold connections)."""

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write the index to a directory (the one it was opened from when no path is given); returns
        the generation folder written. Holds the directory's lock meanwhile (see storage.py); a disk that is full
        or read-only raises StorageFull / StorageUnavailable and leaves the previous generation in place."""
        root = Path(path) if path is not None else self.path
        if root is None:
            raise InvalidInput("save() needs a directory: this index was not opened from one")
        with self._lock, DirLock(root):
            try:
                gen_dir = self._write_generation(root)
            except OSError as exc:
                raise storage_error(exc, f"cannot save the index to {root}") from None
            self.path = root
            if self.copies is not None:  # after the items: a crash between leaves some without a descriptor
                self.copies.save(copies_path(root))
            return gen_dir

    def _write_generation(self, root: Path) -> Path:
        snap = self._snap
        n = snap.n
        arrays = {"codes": snap.words[:n], "ids": snap.ids[:n]}
        if snap.features is not None:
            arrays["features"] = snap.features[:n]
        if snap.scales is not None:
            arrays["scales"] = snap.scales[:n]
        header = {"bits": self.bits, "feature_dim": self.feature_dim, "feature_dtype": self.feature_dtype,
                  "count": n, "code_layout": "uint64-le-words", "model": self.model_info}
        return write_generation(root, arrays, snap.metadata[:n], header)

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True, mmap: bool = True,
             warmup: bool = True) -> HashIndex:
        """Open a saved index: read and check the versioned header, then memory-map the arrays (generations.py).

        `verify` also checks every file's sha256 (about a second per GB); sizes and shapes are always checked.
        `warmup` compiles (or loads from Numba's cache) the search kernels in a background thread; `open` returns at
        once, and searches meanwhile are answered without them (see `warmup`)."""
        root = Path(path)
        gen = read_generation(root, _shapes, verify=verify, mmap=mmap)
        h, a = gen.header, gen.arrays
        try:
            index = cls(bits=h["bits"], feature_dim=h["feature_dim"], feature_dtype=h["feature_dtype"], path=root)
        except InvalidInput as exc:
            raise IndexCorrupt(f"the header in {gen.path} describes no valid index ({exc})") from None
        index.model_info = h.get("model", {})
        index._rows = {i: r for r, i in enumerate(a["ids"].tolist())}
        if len(index._rows) != h["count"]:
            raise IndexCorrupt(f"{gen.path / 'ids.npy'} holds duplicate ids")
        scales = a.get("scales")
        if scales is None and h["feature_dtype"] == "float16" and h["feature_dim"]:  # saved before row scales
            scales = _row_scales(a["features"])
        index._snap = _Snapshot(h["count"], a["codes"], a["ids"], a.get("features"), scales, gen.metadata)
        index.copies = open_copies(root, verify=verify, mmap=mmap, warmup=warmup)
        if warmup:
            index.warmup(background=True)
        return index


def _shapes(header: dict) -> dict[str, tuple]:
    """The arrays a header of this index promises: name -> (dtype, shape)."""
    n, dim, dtype = header["count"], header["feature_dim"], header["feature_dtype"]
    out: dict[str, tuple] = {"codes": (np.uint64, (n, n_words(header["bits"]))), "ids": (np.int64, (n,))}
    if dim:
        out["features"] = (dtype, (n, dim))
        if dtype == "int8" or "scales.npy" in header.get("files", {}):  # float16 files saved before lack them
            out["scales"] = (np.float32, (n,))
    return out


def _like(a: np.ndarray, writeable: bool) -> np.ndarray:
    """A one-row zero array of a's dtype (Numba compiles per dtype, layout and read-only flag)."""
    out = np.zeros((1, *a.shape[1:]), dtype=a.dtype)
    out.flags.writeable = writeable
    return out
