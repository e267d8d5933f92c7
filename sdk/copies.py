"""Copy descriptors beside an index, and near-duplicate groups found by them.

A model with a copy head (export/model.py `CopyHead`) describes each image by a unit vector on which an image and its
altered copies (re-encoded, rescaled, shifted, re-exposed) lie close and other images, near-twins of its class
included, further apart. They live in a second `HashIndex` beside the main one (`<index>/copies/`): its features
are the descriptors, its codes CODE_BITS sign bits of them under a fixed random projection (SimHash), few enough
that a large collection's codes share buckets, so its own two-step search (buckets, k-means cells, sketches) finds
each item's nearest by descriptor without scanning all items; it shares the main index's ids, storage and crash
safety.

No fixed cosine separates copies from near-twins (a dense part of a class holds twins closer than a sparse part's
copies), so the groups are found relative to each item's own neighbourhood (`group_links`): a group of 2, 3 or 4
items that agree on themselves (each member's nearest are exactly the others) is a group of copies when its weakest
cosine inside beats every member's best cosine outside by a margin and reaches a floor (near-twins of a sparse
neighbourhood stand apart from it too, but less close). Groups that share an item join (transitively).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from latenthash.dedup import DuplicateGroup, check_cosine, groups_of
from latenthash.errors import InvalidInput
from latenthash.limits import COPY_FLOOR, COPY_MARGINS, COPY_POOL

COPIES_DIR = "copies"  # the copy index's folder inside the main index's folder
CODE_BITS = 12  # 4,096 codes: a million items share them (buckets.MIN_SHRINK), 60k items still collapse 8x
NEIGHBOURS = 8  # each item's nearest kept for the rule (a group has at most 4 members, so 3 inside and the outsider)
BLOCK = 8192  # items searched at a time (bounded memory, a progress bar that moves)


def copy_index(dim: int, path: str | os.PathLike | None = None):
    """An empty copy index for `dim`-d descriptors (saved at `path`)."""
    from latenthash.index import HashIndex

    return HashIndex(bits=CODE_BITS, feature_dim=dim, feature_dtype="float16", path=path)


def copies_path(index_path: str | os.PathLike) -> Path:
    return Path(index_path) / COPIES_DIR


def open_copies(index_path: str | os.PathLike | None, **options):
    """The copy index saved beside the index at `index_path`, or None where there is none."""
    if index_path is None or not (copies_path(index_path) / "CURRENT").is_file():
        return None
    from latenthash.index import HashIndex

    return HashIndex.open(copies_path(index_path), **options)


def check_copies(copies, n: int, dim: int | None) -> np.ndarray:
    """L2-normalized float32 (n, dim) copy descriptors (any dim the codes allow where `dim` is None); else
    InvalidInput."""
    from latenthash.backend import _float_rows, normalize
    from latenthash.codes import MAX_BITS, MIN_BITS

    c = _float_rows(copies, "copies")
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or len(c) != n or (dim is not None and c.shape[1] != dim) \
            or not MIN_BITS <= c.shape[1] <= MAX_BITS:
        want = f"({n}, {dim})" if dim is not None else f"({n}, D) with D from {MIN_BITS} to {MAX_BITS}"
        raise InvalidInput(f"copies must have shape {want}, got {c.shape}: one descriptor per item from "
                           "Encoder.describe_copies (the same model for the whole index)")
    return normalize(c, "copies")


def sign_codes(descriptors: np.ndarray) -> np.ndarray:
    """The copy index's codes: packed sign bits of descriptors (N, dim) under the fixed projection, uint8 (N, 2)."""
    return np.packbits(descriptors @ _projection(descriptors.shape[1]) > 0, axis=1)


@functools.cache
def _projection(dim: int) -> np.ndarray:
    """A fixed Gaussian projection (dim, CODE_BITS): the same codes in every process and release."""
    return np.random.default_rng(20261208).standard_normal((dim, CODE_BITS)).astype(np.float32)


def check_margins(margins) -> tuple[float, ...]:
    m = tuple(margins)
    if not 1 <= len(m) <= 3 or any(isinstance(x, bool) or not isinstance(x, (int, float, np.floating))
                                   or not 0.0 <= x <= 2.0 for x in m):
        raise InvalidInput(f"margins must be 1 to 3 cosine margins from 0 to 2 (for groups of 2, 3, 4), "
                           f"got {margins!r}")
    return tuple(float(x) for x in m)


def group_links(sims: np.ndarray, rows: np.ndarray, size: int, margin: float,
                floor: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    """Groups of `size` that agree on themselves: an item and its size - 1 nearest (`rows`, (n, k) other rows best
    first, `sims` their cosines), each of whom has exactly the others as its own size - 1 nearest, whose weakest
    cosine inside reaches `floor` and beats the best one to an outsider (each member's size-th nearest) by
    `margin`. Returns the links (item, other member)."""
    n = len(rows)
    members = np.column_stack([np.arange(n), rows[:, :size - 1]])
    group = np.sort(members, axis=1)
    agree = (members >= 0).all(axis=1)
    safe = np.where(members >= 0, members, 0)
    for j in range(1, size):
        m = safe[:, j]
        agree &= (np.sort(np.column_stack([m, rows[m, :size - 1]]), axis=1) == group).all(1)
    inside, outside = sims[safe, size - 2].min(axis=1), sims[safe, size - 1].max(axis=1)
    keep = agree & (inside - outside >= margin) & (inside >= floor)
    return np.repeat(np.flatnonzero(keep), size - 1), members[keep, 1:].reshape(-1)


def nearest(index, *, pool: int = COPY_POOL, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows) of every stored item's NEIGHBOURS nearest others in the copy index by its two-step search,
    best first (row -1, cosine -inf where it holds fewer)."""
    from latenthash.codes import from_words
    from latenthash.progress import progress as progress_bar

    snap = index._snap
    n, ids = snap.n, snap.ids[: snap.n]
    by_id = np.argsort(ids, kind="stable")
    k = min(NEIGHBOURS + 1, n)
    sims = np.full((n, NEIGHBOURS + 1), -np.inf, np.float32)
    rows = np.full((n, NEIGHBOURS + 1), -1, np.int64)
    for lo in progress_bar(range(0, n, BLOCK), show=progress, desc="copies", unit="block"):
        mine = np.arange(lo, min(n, lo + BLOCK))
        found = index.search(from_words(snap.words[mine], index.bits), k=k,
                             features=index._float_features(snap, mine), pool=max(pool, k))
        valid = np.arange(k)[None, :] < found.counts[:, None]
        hit = np.where(valid, by_id[np.searchsorted(ids, found.ids, sorter=by_id).clip(0, n - 1)], -1)
        others = np.argsort(hit == mine[:, None], axis=1, kind="stable")  # the item itself last
        sims[mine, :k] = np.take_along_axis(np.where(valid, found.scores, -np.inf), others, 1)
        rows[mine, :k] = np.take_along_axis(hit, others, 1)
    return sims[:, :NEIGHBOURS], rows[:, :NEIGHBOURS]


def copy_groups(index, *, margins=COPY_MARGINS, floor: float = COPY_FLOOR, pool: int = COPY_POOL,
                progress: bool = False) -> list[DuplicateGroup]:
    """Groups of copies in a copy index, largest first: the group rule (`group_links`) over each item's nearest,
    groups sharing an item joined. Each member's score is its best cosine to another member."""
    margins = check_margins(margins)
    floor = check_cosine(floor, "floor")
    snap = index._snap
    n = snap.n
    if n < 2:
        return []
    index.warmup()  # kernels and buckets before the searches: they would scan every item meanwhile
    sims, rows = nearest(index, pool=pool, progress=progress)
    links = [group_links(sims, rows, size, m, floor) for size, m in enumerate(margins, start=2) if size <= n]
    a = np.concatenate([x for x, _ in links])
    b = np.concatenate([y for _, y in links])
    best = np.full(n, -np.inf, np.float32)
    for x, y in ((a, b), (b, a)):  # each member's best cosine to another member it is linked with
        hit = rows[x] == y[:, None]
        np.maximum.at(best, x, np.where(hit, sims[x], -np.inf).max(axis=1))
    return groups_of(a, b, snap.ids[:n], best)
