"""Code buckets: the distinct codes of an index snapshot, each with the rows that hold it.

Codes learned from class labels collapse: a trained model maps most images of a class onto a few codewords
(Fashion-MNIST's 60k training images hold 5,196 distinct 48-bit codes; the 1M-item benchmark database 9,062). Step 1
of a search then needs the distances to the distinct codes only and takes whole buckets nearest first, which
returns exactly what the full scan returns (ties by database order) for a fraction of the work. Random or very
diverse codes gain nothing from this, so buckets are kept only when they shrink the scan at least MIN_SHRINK times.

For the re-rank (step 2), buckets also keep a finer binary code of every row in bucket order: a sketch of SKETCH_BITS
random-projection sign bits of its feature minus the snapshot's mean feature, whose Hamming distance tracks the angle
between features (SimHash; binary quantization with oversampling and rescoring, as Qdrant does it). A pool of whole
buckets then reads contiguous rows at a few popcounts each (see `kernels.sign_shells`), and only its nearest rows by
sketch are re-scored from the stored features. The sign bits of the centred features themselves (no projection)
were tried first: three-quarters of the features are zero after the ReLU, and those bits carried too little.

Buckets describe one snapshot. They are built off the query path, in a background thread started by the first
search that finds them stale (and by `HashIndex.warmup`); until they are ready, searches scan, so an index under
constant writes simply keeps scanning.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from latenthash.codes import to_words
from latenthash.numpy_search import float_rows

MIN_ROWS = 16_384  # below this a scan takes ~20 us (at 32k-60k learned codes buckets were 3-4x faster than it)
MIN_SHRINK = 8  # distinct codes must be at most n / MIN_SHRINK
CENTRE_STRIDE = 8
SKETCH_BITS = 512  # per row: 64 bytes; 256 bits of a 256-d feature lost a tenth of recall@10 at 1M (RESULTS.md)


@dataclass(frozen=True)
class Buckets:
    snapshot: weakref.ref  # the snapshot described; valid only while it is the index's current one
    codes: np.ndarray | None  # (U, W) uint64 distinct codes; None: too diverse to be worth it
    offsets: np.ndarray | None  # (U + 1,) int64: bucket u holds rows[offsets[u]:offsets[u + 1]]
    rows: np.ndarray | None  # (n,) int64, ascending within each bucket
    signs: np.ndarray | None = None  # (ceil(n / 8), SKETCH_BITS / 64, 8) uint64 sketches, bucket order (see below)
    centre: np.ndarray | None = None  # (D,) float32 mean stored feature
    projection: np.ndarray | None = None  # (D, SKETCH_BITS) float32: column j is sketch bit j's random hyperplane


def _sketch(f: np.ndarray, centre: np.ndarray, projection: np.ndarray) -> np.ndarray:
    return to_words(np.packbits((f - centre) @ projection > 0, axis=1), projection.shape[1])


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
    sketch = _sketch_rows(snapshot, order) if snapshot.features is not None else (None, None, None)
    return Buckets(ref, np.ascontiguousarray(ordered[starts]), np.append(starts, n).astype(np.int64),
                   order.astype(np.int64), *sketch)


def _sketch_rows(snapshot, order: np.ndarray, chunk: int = 65536):
    """Every stored feature's sketch, in bucket order, with the centre and projection that made them (a fixed seed:
    the same features always give the same sketches)."""
    n, dim = len(order), snapshot.features.shape[1]

    def rows(lo: int) -> np.ndarray:
        return float_rows(snapshot.features, snapshot.scales, order[lo:lo + chunk])

    # the centre from every CENTRE_STRIDE-th stored row (in storage order, not gathered): a mean of 7,500 rows or
    # more is the mean for the sketches' purpose, for a fraction of a pass over every row
    sample = float_rows(snapshot.features, snapshot.scales, slice(0, n, CENTRE_STRIDE))
    centre = sample.mean(axis=0, dtype=np.float64).astype(np.float32) if len(sample) else np.zeros(dim, np.float32)
    projection = np.random.default_rng(0).standard_normal((dim, SKETCH_BITS)).astype(np.float32)
    signs = np.zeros((-(-n // 8) * 8, SKETCH_BITS // 64), np.uint64)
    for lo in range(0, n, chunk):
        signs[lo:lo + chunk] = _sketch(rows(lo), centre, projection)
    return block_sketches(signs), centre, projection


def block_sketches(signs: np.ndarray) -> np.ndarray:
    """Row sketches (n, S) (n a multiple of 8) laid out as (n / 8, S, 8): word t of 8 consecutive rows side by
    side, so that one vector instruction serves 8 rows (see `kernels._block_distances`)."""
    return np.ascontiguousarray(signs.reshape(-1, 8, signs.shape[1]).transpose(0, 2, 1))


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
