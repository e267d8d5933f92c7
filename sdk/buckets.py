"""Code buckets: the distinct codes of an index snapshot, each with the rows that hold it.

Codes learned from class labels collapse: a trained model maps most images of a class onto a few codewords
(Fashion-MNIST's 60k training images hold 5,196 distinct 48-bit codes; the 1M-item benchmark database 9,062). Step 1
of a search then needs the distances to the distinct codes only and takes whole buckets nearest first, which
returns exactly what the full scan returns (ties by database order) for a fraction of the work. Random or very
diverse codes gain nothing from this, so buckets are kept only when they shrink the scan at least MIN_SHRINK times.

For the re-rank (step 2), buckets also keep the features in bucket order as int8: a pool of whole buckets then
reads contiguous rows (see `kernels.score_shells`), at a quarter of float32's memory.

Buckets describe one snapshot. They are built off the query path, in a background thread started by the first
search that finds them stale (and by `HashIndex.warmup`); until they are ready, searches scan, so an index under
constant writes simply keeps scanning.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

MIN_ROWS = 16_384  # below this a scan takes ~20 us (at 32k-60k learned codes buckets were 3-4x faster than it)
MIN_SHRINK = 8  # distinct codes must be at most n / MIN_SHRINK


@dataclass(frozen=True)
class Buckets:
    snapshot: weakref.ref  # the snapshot described; valid only while it is the index's current one
    codes: np.ndarray | None  # (U, W) uint64 distinct codes; None: too diverse to be worth it
    offsets: np.ndarray | None  # (U + 1,) int64: bucket u holds rows[offsets[u]:offsets[u + 1]]
    rows: np.ndarray | None  # (n,) int64, ascending within each bucket
    features: np.ndarray | None = None  # (n, D) int8 features in bucket order (row rows[j] at j), for step 2
    scales: np.ndarray | None = None  # (n,) float32 per-row scale of `features`


def build(snapshot) -> Buckets:
    """Group a snapshot's rows by code with a stable sort, so every bucket lists its rows in database order."""
    n = snapshot.n
    words = snapshot.words[:n]
    if words.shape[1] == 1:
        order = np.argsort(words[:, 0], kind="stable")
        ordered = words[order]
        change = ordered[1:, 0] != ordered[:-1, 0]
    else:
        order = np.lexsort(words.T[::-1])  # stable; first word most significant
        ordered = words[order]
        change = (ordered[1:] != ordered[:-1]).any(axis=1)
    starts = np.flatnonzero(np.concatenate([[n > 0], change]))
    ref = weakref.ref(snapshot)
    if len(starts) * MIN_SHRINK > n:
        return Buckets(ref, None, None, None)
    feats, scales = _int8_rows(snapshot, order) if snapshot.features is not None else (None, None)
    return Buckets(ref, np.ascontiguousarray(ordered[starts]), np.append(starts, n).astype(np.int64),
                   order.astype(np.int64), feats, scales)


def _int8_rows(snapshot, order: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The snapshot's features in bucket order as int8 with a float32 scale per row: a pool of whole buckets then
    reads contiguous memory, a quarter of float32's (step 2 re-scores its best candidates from the stored features,
    so the int8 rounding never reaches a returned score)."""
    n, dim = len(order), snapshot.features.shape[1]
    out = np.empty((n, dim), np.int8)
    scales = np.empty(n, np.float32)
    for lo in range(0, n, chunk):
        rows = order[lo:lo + chunk]
        f = snapshot.features[rows].astype(np.float32)
        if snapshot.scales is not None:
            f *= snapshot.scales[rows, None]
        s = np.maximum(np.abs(f).max(axis=1), 1e-12) / 127.0
        out[lo:lo + chunk] = np.round(f / s[:, None])
        scales[lo:lo + chunk] = s
    return out, scales


class BucketCache:
    """The buckets of an index's latest snapshot, rebuilt in the background when the snapshot changes."""

    def __init__(self):
        self._current: Buckets | None = None
        self._lock = threading.Lock()
        self._building = False

    def get(self, snapshot) -> Buckets | None:
        """Usable buckets for this snapshot, or None (then the caller scans; a build starts if worthwhile)."""
        current = self._current
        if current is not None and current.snapshot() is snapshot:
            return current if current.codes is not None else None
        if snapshot.n >= MIN_ROWS:
            self._start(snapshot)
        return None

    def build_now(self, snapshot) -> Buckets:
        self._current = build(snapshot)
        return self._current

    def warm(self, snapshot) -> None:
        """Build now (off the query path, ~0.1 s per million rows) when the snapshot is large enough to gain."""
        if snapshot.n >= MIN_ROWS:
            self.build_now(snapshot)

    def _start(self, snapshot) -> None:
        with self._lock:
            if self._building:
                return
            self._building = True
        threading.Thread(target=self._build, args=(snapshot,), daemon=True, name="latenthash-buckets").start()

    def _build(self, snapshot) -> None:
        try:
            self.build_now(snapshot)
        finally:
            self._building = False
