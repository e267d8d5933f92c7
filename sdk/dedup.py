"""Near-duplicate groups: items whose codes lie within Hamming radius R of each other and whose features' cosine is
at least S, grouped transitively (a copy of a copy joins the group), largest groups first.

Never all pairs: rows are grouped by code (a learned code holds many items), only codewords within R of each other
are paired (one popcount per pair of distinct codes), and within a codeword and its neighbours the rows are scored
by one matrix product per codeword. The cost follows the number of distinct codes squared (tens of thousands for
learned codes at a million items) and the sizes of neighbouring buckets, not the number of items squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latenthash.errors import InvalidInput
from latenthash.limits import DEDUP_MIN_SCORE, DEDUP_RADIUS
from latenthash.numpy_search import float_rows

BLOCK = 2048  # rows of a codeword scored against its candidates at a time (memory: BLOCK x candidates floats)


@dataclass(frozen=True)
class DuplicateGroup:
    """One group of near-duplicates: ids in database order, each with its best cosine to another member (NaN in
    an index without features, where the codes alone decide)."""

    ids: np.ndarray
    scores: np.ndarray
    metadata: list | None = None  # per item (filled by Searcher and Client)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"DuplicateGroup({len(self)} items: {self.ids[:5].tolist()}{' ...' if len(self) > 5 else ''})"


def check_dedup(radius, min_score, bits: int) -> tuple[int, float]:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or not 0 <= radius <= bits:
        raise InvalidInput(f"radius must be an integer from 0 to {bits}, got {radius!r}")
    return int(radius), check_cosine(min_score, "min_score")


def check_cosine(value, name: str) -> float:
    """A cosine threshold from -1 to 1, as a float; else InvalidInput naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not -1.0 <= value <= 1.0:
        raise InvalidInput(f"{name} must be a cosine from -1 to 1, got {value!r}")
    return float(value)


def find_duplicates(words: np.ndarray, features: np.ndarray | None, scales: np.ndarray | None, ids: np.ndarray, *,
                    bits: int, radius: int = DEDUP_RADIUS, min_score: float = DEDUP_MIN_SCORE,
                    progress: bool = False) -> list[DuplicateGroup]:
    """Groups of near-duplicates among rows of `words` (n, W) uint64 with stored `features` (n, D; float32, float16
    or int8 with `scales`), largest first (ties by first id's row)."""
    from latenthash import kernels as K
    from latenthash.progress import progress as progress_bar

    radius, min_score = check_dedup(radius, min_score, bits)
    n = len(ids)
    if n < 2:
        return []
    order = np.lexsort(words.T[::-1]) if words.shape[1] > 1 else np.argsort(words[:, 0], kind="stable")
    ordered = words[order]
    starts = np.flatnonzero(np.concatenate([[True], (ordered[1:] != ordered[:-1]).any(axis=1)]))
    offsets = np.append(starts, n).astype(np.int64)
    ucodes = np.ascontiguousarray(ordered[starts])
    first, second = K.code_pairs(ucodes.reshape(-1), len(ucodes), ucodes.shape[1], np.int64(radius))
    neighbours = np.split(second, np.searchsorted(first, np.arange(1, len(ucodes))))
    best = np.full(n, np.nan if features is None else -np.inf, np.float32)
    pair_a: list[np.ndarray] = []
    pair_b: list[np.ndarray] = []
    for u in progress_bar(range(len(ucodes)), show=progress, desc="dedup", unit="code"):
        rows_u = order[offsets[u]:offsets[u + 1]]
        if features is None:  # codes alone: a codeword's rows are one group, joined with its neighbours'
            pair_a.append(np.repeat(rows_u[0], len(rows_u) - 1 + len(neighbours[u])))
            pair_b.append(np.concatenate([rows_u[1:], order[offsets[neighbours[u]]]]))
            continue
        cand = np.concatenate([rows_u, *(order[offsets[v]:offsets[v + 1]] for v in neighbours[u])])
        fu, fc = float_rows(features, scales, rows_u), float_rows(features, scales, cand)
        for lo in range(0, len(rows_u), BLOCK):  # bounded memory: BLOCK x candidates scores at a time
            sims = fu[lo:lo + BLOCK] @ fc.T
            # each pair once: of this codeword's own rows, only the later ones (another codeword's rows all count)
            own = np.arange(len(rows_u))[None, :] <= np.arange(lo, lo + len(sims))[:, None]
            sims[:, :len(rows_u)][own] = -np.inf
            i, j = np.nonzero(sims >= min_score)
            pair_a.append(rows_u[lo + i])
            pair_b.append(cand[j])
            rows, cols = sims.max(axis=1), sims.max(axis=0)  # each row's best partner, linked or not
            mine = rows_u[lo:lo + BLOCK]
            best[mine] = np.maximum(best[mine], np.where(rows >= min_score, rows, -np.inf))
            best[cand] = np.maximum(best[cand], np.where(cols >= min_score, cols, -np.inf))
    a = np.concatenate(pair_a) if pair_a else np.zeros(0, np.int64)
    b = np.concatenate(pair_b) if pair_b else np.zeros(0, np.int64)
    return groups_of(a, b, ids, best)


def groups_of(a: np.ndarray, b: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> list[DuplicateGroup]:
    """The groups that links between rows (a[i], b[i]) make, joined transitively, largest first (ties by first
    row); `scores` per row. The one builder of duplicate groups."""
    from latenthash import kernels as K

    n = len(ids)
    labels = K.components(n, a.astype(np.int64), b.astype(np.int64))
    sizes = np.bincount(labels, minlength=n)
    members = np.flatnonzero(sizes[labels] >= 2)
    if not len(members):
        return []
    by_group = members[np.argsort(labels[members], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[by_group])) + 1
    groups = [DuplicateGroup(ids[rows], scores[rows]) for rows in np.split(by_group, cuts)]
    groups.sort(key=lambda g: -len(g))  # stable: equal sizes stay in order of their first row
    return groups
