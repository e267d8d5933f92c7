"""Search without compiled kernels: what an index answers while its Numba kernels compile.

On a fresh install, or where no cache directory is writable, the kernels compile at first use, which takes seconds
to tens of seconds. Meanwhile `HashIndex` answers through these numpy versions, so a server answers a search as soon as
its index is open. Exact Hamming top-k and radius search give the kernels' results (ties by database order); the
two-step search scores every row of its pool from the stored features (the exact answer the kernels approximate in
large indexes by ranking the pool by feature sketches first). Slower per query than the kernels, but nothing compiles.
"""

from __future__ import annotations

import numpy as np

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def distances(words: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamming distances (n,) int64 between the rows of `words` (n, W) uint64 and one query `q` (W,) uint64."""
    x = np.bitwise_xor(words, q[None, :])
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).sum(axis=1, dtype=np.int64)
    return _POPCOUNT8[x.view(np.uint8)].sum(axis=1, dtype=np.int64)


def nearest(d: np.ndarray, k: int) -> np.ndarray:
    """The k rows of smallest distance in `d`, ordered by (distance, row): the kernels' tie rule."""
    if k >= len(d):
        return np.argsort(d, kind="stable")
    kth = np.partition(d, k - 1)[k - 1]
    below = np.flatnonzero(d < kth)
    cand = np.concatenate([below, np.flatnonzero(d == kth)[: k - len(below)]])
    return cand[np.argsort(d[cand], kind="stable")]


def within(d: np.ndarray, radius: int, limit: int) -> np.ndarray:
    """Rows at distance <= radius, ordered by (distance, row), at most `limit`."""
    rows = np.flatnonzero(d <= radius)
    return rows[np.argsort(d[rows], kind="stable")][:limit]


def search(words: np.ndarray, ids: np.ndarray, features: np.ndarray | None, scales: np.ndarray | None,
           qw: np.ndarray, qf: np.ndarray | None, *, k: int, radius: int | None, target: int, bits: int):
    """One index search as `HashIndex.search` defines it, over the first n = len(ids) rows: returns (ids, distances,
    counts, scores or None), each row -1 / NaN padded to the widest. `qf` (normalized query features) asks for the
    two-step search: the pool (whole shells reaching `target`, or every row within `radius`, at most `target`) is
    re-ranked by cosine, ties by pool order (distance, then row)."""
    n = len(ids)
    hits: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    for i, q in enumerate(qw):
        d = distances(words[:n], q)
        if qf is None:
            rows = nearest(d, k) if radius is None else within(d, radius, k)
            hits.append((rows, d[rows], None))
            continue
        assert features is not None  # check_query gives query features only to an index that stores them
        if radius is None:  # whole shells, in row order: the pool order only breaks ties, below
            covered = np.cumsum(np.bincount(d, minlength=bits + 1))
            pool = np.flatnonzero(d <= int(np.argmax(covered >= min(target, len(d)))))
        else:
            pool = within(d, radius, target)
        scores = float_rows(features, scales, pool) @ qf[i]
        cand = np.arange(len(pool))
        if len(pool) > k:  # the k best and every score tied with the k-th, then ordered as the kernels order them
            cand = np.flatnonzero(scores >= np.partition(scores, len(pool) - k)[len(pool) - k])
        best = cand[np.lexsort((pool[cand], d[pool[cand]], -scores[cand]))][:k]
        hits.append((pool[best], d[pool[best]], scores[best]))
    width = max(1, max((len(r) for r, _, _ in hits), default=0))
    out_ids = np.full((len(qw), width), -1, np.int64)
    out_d = np.full((len(qw), width), -1, np.int64)
    out_s = np.full((len(qw), width), np.nan, np.float32) if qf is not None else None
    for i, (rows, dist, score) in enumerate(hits):
        out_ids[i, : len(rows)], out_d[i, : len(rows)] = ids[rows], dist
        if out_s is not None:
            out_s[i, : len(rows)] = score
    return out_ids, out_d, np.array([len(r) for r, _, _ in hits], np.int64), out_s


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """`kernels.unit_rows` in numpy: row-wise L2 normalization (zero rows stay zero) and whether all was finite."""
    norms = np.sqrt(np.square(x, dtype=np.float64).sum(axis=1))
    finite = bool(np.isfinite(norms).all())
    return (x / np.maximum(norms, 1e-12)[:, None]).astype(np.float32), finite


def float_rows(features: np.ndarray, scales: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Stored feature rows (float32, or float16 / int8 with per-row `scales`) as float32."""
    f = _as_float32(features[rows])
    return f * scales[rows, None] if scales is not None else f


def _as_float32(f: np.ndarray) -> np.ndarray:
    """float16 rows as float32 by integer arithmetic on their bits, twice as fast as numpy's own cast here (exact
    for every finite value, subnormals included; stored features are always finite)."""
    if f.dtype != np.float16:
        return f.astype(np.float32)
    h = f.view(np.uint16).astype(np.uint32)
    magnitude = ((h & 0x7FFF) << 13).view(np.float32) * np.float32(2.0**112)  # exponent bias 15 -> 127
    return (magnitude.view(np.uint32) | ((h & 0x8000) << 16)).view(np.float32)
