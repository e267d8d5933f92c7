"""Code buckets: the distinct codes of an index snapshot, each with the rows that hold it.

Codes learned from class labels collapse: a trained model maps most images of a class onto a few codewords
(Fashion-MNIST's 60k training images hold 5,196 distinct 48-bit codes; the 1M-item benchmark database 9,062). Step 1
of a search then needs the distances to the distinct codes only and takes whole buckets nearest first, which
returns exactly what the full scan returns (ties by database order) for a fraction of the work. Random or very
diverse codes gain nothing from this, so buckets are kept only when they shrink the scan at least MIN_SHRINK times.

Learned codes collapse so far that one bucket can hold a whole class (tens of thousands of rows at 1M), so a
pool of whole buckets is far larger than the candidates a search needs. With features, each bucket larger than
MIN_CELL_ROWS rows is therefore split by spherical k-means on its own features (an inverted file inside the bucket,
whose coarse quantizer is the hash layer); a smaller bucket is one cell; each cell keeps its unit mean feature.
A bucket of B rows gets cells of about CELL_SCALE sqrt(B) rows, within MIN_CELL_ROWS..CELL_ROWS (`cells_for`): an
inverted file's lists grow as the square root of what they index, as the cut compares the centroids of the
shells' cells and the pool reads the rows of the cells it keeps. A small index's class-sized buckets get finer
cells, which cut its shells to a pool that holds more of the true neighbours per row read; a large index's keep
CELL_ROWS, where finer cells cost more centroids than their cut saved (RESULTS.md has both). Step 1 takes the
shells covering SHELL_WIDEN x the pool (fewer where far shells would bring more than one cell per
kernels.CELL_SHARE pool rows) and keeps the cells nearest the query by centroid until they cover the pool (see
`kernels._cell_ranges`).

Step 2 first ranks that pool by a finer binary code of every row, kept in cell order: a sketch of SKETCH_BITS
sign bits of its feature minus the snapshot's mean feature after a random rotation (SimHash; binary quantization
with oversampling and rescoring, as Qdrant does it). The query keeps its rotated coordinates in 6-bit levels
(asymmetric, as RaBitQ and Qdrant's binary quantization query): the distance sum_j |L s_j - v_j| ranks the rows
by their signs' dot product with the query, which needed about a third of the exact re-scores that the Hamming
distance between two sign sketches needed for the same recall (RESULTS.md; see `kernels.query_levels`). The rotation is
structured (random sign flips and Walsh-Hadamard transforms, as fast Johnson-Lindenstrauss transforms
are built): P log P additions a row where a Gaussian projection was a D x SKETCH_BITS matrix product, the largest
part of the bucket build. A pool of cells
reads contiguous rows at a few popcounts each (see `kernels._sketch_pick`), and only its nearest rows by sketch are
re-scored from the stored features. The sign bits of the centred features themselves (no projection) were tried
first: three-quarters of the features are zero after the ReLU, and those bits carried too little.

Buckets describe one snapshot. They are built off the query path, in a background thread started by the first
search that finds them stale (and by `HashIndex.warmup`); until they are ready, searches scan, so an index under
constant writes simply keeps scanning.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from latenthash.numpy_search import float_rows

MIN_ROWS = 16_384  # below this a scan takes ~20 us (at 32k-60k learned codes buckets were 3-4x faster than it)
MIN_SHRINK = 8  # distinct codes must be at most n / MIN_SHRINK
CENTRE_STRIDE = 8
SKETCH_BITS = 512  # per row: 64 bytes; 256 bits of a 256-d feature lost a tenth of recall@10 at 1M (RESULTS.md)
SKETCH_ROUNDS = 2  # sign flips and Walsh-Hadamard transforms per rotation (kernels._sketch_block)
CELL_ROWS = 256  # the most rows per k-means cell of a bucket (the cells that cut a shell down to the pool) ...
MIN_CELL_ROWS = 128  # ... the fewest (a bucket of at most this many rows is one cell) ...
CELL_SCALE = 1.5  # ... and between them, CELL_SCALE x the square root of the bucket's rows
KMEANS_SAMPLE = 32  # rows per cell that train a bucket's k-means (all its rows are assigned after)
KMEANS_ITERS = 5
KMEANS_SEED = 0  # with the bucket's number, each bucket's k-means seed (fixed: the same features, the same cells)
SHELL_WIDEN = 8  # step 1's shells cover this many times the pool before its cells cut them to the pool


@dataclass(frozen=True)
class Buckets:
    snapshot: weakref.ref  # the snapshot described; valid only while it is the index's current one
    codes: np.ndarray | None  # (U, W) uint64 distinct codes; None: too diverse to be worth it
    offsets: np.ndarray | None  # (U + 1,) int64: bucket u holds rows[offsets[u]:offsets[u + 1]]
    rows: np.ndarray | None  # (n,) int64, ascending within each bucket (the exact Hamming top-k's tie order)
    cell_rows: np.ndarray | None = None  # (n,) int64: the same rows, each bucket's grouped by cell ("cell order")
    cells: np.ndarray | None = None  # (G + 1,) int64: cell g holds cell_rows[cells[g]:cells[g + 1]]
    bucket_cells: np.ndarray | None = None  # (U + 1,) int64: bucket u's cells are bucket_cells[u]:bucket_cells[u + 1]
    sizes: np.ndarray | None = None  # (U,) int64: bucket u's rows << 32 | its cells (both counted in one histogram)
    centroids: np.ndarray | None = None  # (G, D) uint16: each cell's unit mean feature, float16 bit patterns
    signs: np.ndarray | None = None  # (ceil(n / 8), SKETCH_BITS / 64, 8) uint64 sketches, cell order (see below)
    centre: np.ndarray | None = None  # (D,) float32 mean stored feature
    flips: np.ndarray | None = None  # (R, SKETCH_ROUNDS, P) float32 +-1: the sketch's random rotations (see below)

    @functools.cached_property
    def kernel_layout(self) -> tuple:
        """The cells as the two-step kernels take them, first arguments in order (`kernels._candidates`: codes
        flattened, their count and words per code, sizes, bucket_cells, cells, centroids, signs): made once, as one
        query's search is short enough to feel a dozen attribute reads."""
        codes = self.codes
        assert codes is not None
        return (codes.reshape(-1), len(codes), codes.shape[1], self.sizes, self.bucket_cells, self.cells,
                self.centroids, self.signs)


def build(snapshot) -> Buckets:
    """Group a snapshot's rows by code with a stable sort, so every bucket lists its rows in database order; with
    features, also each bucket's cells and every row's sketch, in cell order."""
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
    layout = (np.ascontiguousarray(ordered[starts]), np.append(starts, n).astype(np.int64), order.astype(np.int64))
    if snapshot.features is None:
        return Buckets(ref, *layout)
    # numpy's BLAS on one thread: its threads spin on the cores for a while after each k-means product, and the
    # parallel kernels that follow (the sketches) then ran at the speed of one thread
    with threadpool_limits(limits=1, user_api="blas"):
        cell_order, sizes, per_bucket = _cell_layout(snapshot, order, starts)
        cell_rows = layout[2][cell_order]
        centroids, sketch = _scan_cells(snapshot, cell_rows, sizes)
    bucket_sizes = (np.diff(layout[1]) << 32) | per_bucket  # rows < 2^31: an in-memory index is far smaller
    return Buckets(ref, *layout, cell_rows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   np.concatenate([[0], np.cumsum(per_bucket)]).astype(np.int64), bucket_sizes, centroids, *sketch)


def _cell_layout(snapshot, order: np.ndarray, starts: np.ndarray):
    """Each bucket's cells (`cells_for`): a bucket split by k-means of its features, or a single cell. Returns (the
    bucket order's positions regrouped by cell, stable within a cell; the rows per cell, empty cells dropped; the
    cells per bucket).

    The buckets' k-means run on the kernels' threads, each on one BLAS thread (see `build`), a few buckets ahead of
    the calling thread, which gathers their features (a parallel kernel: launched from one thread only)."""
    from latenthash import kernels  # lazy, as everywhere: numba is heavy to import

    n = len(order)
    ends = np.append(starts[1:], n)
    positions = np.arange(n)
    sizes = [np.array([e - s]) for s, e in zip(starts, ends)]

    def place(u: int, assign: np.ndarray) -> None:
        positions[starts[u]:ends[u]] = starts[u] + np.argsort(assign, kind="stable")
        counts = np.bincount(assign)
        sizes[u] = counts[counts > 0]

    workers = kernels.threads()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latenthash-kmeans") as pool:
        running: collections.deque = collections.deque()
        for u in np.flatnonzero(ends - starts > min(CELL_ROWS, MIN_CELL_ROWS)):
            c = cells_for(ends[u] - starts[u])
            if c > 1:  # a seed per bucket: the same features give the same cells, whichever thread runs them
                x = _gather(snapshot, order[starts[u]:ends[u]])
                running.append((u, pool.submit(_kmeans, x, c, np.random.default_rng((KMEANS_SEED, int(u))))))
            while len(running) > 2 * workers:  # bounded: each holds its bucket's features as float32
                place(running[0][0], running.popleft()[1].result())
        for u, job in running:
            place(u, job.result())
    return positions, np.concatenate(sizes), np.array([len(c) for c in sizes])


def cells_for(rows: int) -> int:
    """How many k-means cells a bucket of `rows` rows is split into: cells of CELL_SCALE sqrt(rows) rows, at least
    MIN_CELL_ROWS and at most CELL_ROWS each (the upper bound wins)."""
    size = min(CELL_ROWS, max(MIN_CELL_ROWS, CELL_SCALE * math.sqrt(rows)))
    return max(1, math.ceil(rows / size))


def _gather(snapshot, rows: np.ndarray) -> np.ndarray:
    """Stored feature rows as float32 (float16 storage, the default, by one kernel pass)."""
    if snapshot.features.dtype == np.float16:
        from latenthash import kernels  # lazy, as everywhere: numba is heavy to import

        return kernels.half_gather(snapshot.features.view(np.uint16), rows)
    return float_rows(snapshot.features, snapshot.scales, rows)


def _kmeans(x: np.ndarray, c: int, rng) -> np.ndarray:
    """Spherical k-means of unit rows x into c cells, trained on KMEANS_SAMPLE rows per cell; every row's cell."""
    from latenthash import kernels  # lazy, as everywhere: numba is heavy to import

    sample = x[rng.choice(len(x), min(len(x), KMEANS_SAMPLE * c), replace=False)]
    centres = sample[rng.choice(len(sample), c, replace=False)]
    for _ in range(KMEANS_ITERS):
        assign = (sample @ centres.T).argmax(axis=1)
        by = np.argsort(assign, kind="stable")
        present, first = np.unique(assign[by], return_index=True)
        sums = kernels.segment_sums(sample[by], first)
        centres[present] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(x), np.int64)
    for lo in range(0, len(x), 16384):  # bounded temporaries: (16384, c) similarities at a time
        out[lo:lo + 16384] = (x[lo:lo + 16384] @ centres.T).argmax(axis=1)
    return out


def _scan_cells(snapshot, cell_rows: np.ndarray, sizes: np.ndarray, chunk: int = 65536):
    """One pass over every stored feature in cell order: each cell's unit mean (float16 bits) and each row's
    sketch, with the centre and rotations that made them (a fixed seed: the same features always give the same
    sketches)."""
    from latenthash import kernels  # lazy, as everywhere: numba is heavy to import

    n, dim = len(cell_rows), snapshot.features.shape[1]
    # the centre from every CENTRE_STRIDE-th stored row (in storage order, not gathered): a mean of 7,500 rows or
    # more is the mean for the sketches' purpose, for a fraction of a pass over every row
    sample = _gather(snapshot, np.arange(0, n, CENTRE_STRIDE))
    centre = sample.mean(axis=0, dtype=np.float64).astype(np.float32) if len(sample) else np.zeros(dim, np.float32)
    flips = sketch_flips(dim)
    signs = np.zeros((-(-n // 8) * 8, SKETCH_BITS // 64), np.uint64)
    cell_of = np.repeat(np.arange(len(sizes)), sizes)
    sums = np.zeros((len(sizes), dim), np.float32)
    for lo in range(0, n, chunk):
        f = _gather(snapshot, cell_rows[lo:lo + chunk])
        signs[lo:lo + chunk] = kernels.sketch_rows(f, centre, flips, SKETCH_BITS)
        c = cell_of[lo:lo + chunk]
        first = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
        sums[c[first]] += kernels.segment_sums(f, first)  # a cell's rows are contiguous: each once per chunk
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float16).view(np.uint16), (block_sketches(signs), centre, flips)


def sketch_flips(dim: int) -> np.ndarray:
    """The random signs of the sketch's rotations for dim-d features: (R, SKETCH_ROUNDS, P) float32 +-1, P the
    power of two at or above dim and at least 64 (a rotation fills whole sketch words), R enough rotations of P
    coordinates for SKETCH_BITS bits (fixed seed)."""
    p = 1 << max(6, int(dim - 1).bit_length())
    shape = (-(-SKETCH_BITS // p), SKETCH_ROUNDS, p)
    return np.where(np.random.default_rng(0).random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def block_sketches(signs: np.ndarray) -> np.ndarray:
    """Row sketches (n, S) (n a multiple of 8) laid out as (n / 8, S, 8): word t of 8 consecutive rows side by
    side, so that one vector instruction serves 8 rows (see `kernels._block_levels`)."""
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
