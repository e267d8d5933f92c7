"""Retrieval metrics shared by `latenthash eval` and the benchmarks (torch-free).

Ranking by Hamming distance breaks ties by database order (a stable sort): of two items at the same distance the
one added first ranks first. That makes every figure deterministic, and the kernel below computes the exact
metrics of that ranking in O(N) per query (a counting sort by distance) instead of sorting.

Definitions (per query, then averaged over queries):
- AP over the whole database: mean of P@i over the ranks i of relevant items; 0 when nothing is relevant.
- AP@k: sum of P@i * rel_i over the top k, divided by the number of relevant items in the top k (0 when none).
- precision@k: relevant items among the first k.
- precision within Hamming radius r: relevant / retrieved among items at distance <= r; 0 when none is retrieved.
- recall within radius r: relevant items within r / all relevant items.
Relevance: the same class (single-label) or at least one shared label (multi-label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latenthash.codes import to_words

DEFAULT_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def label_masks(labels: np.ndarray) -> np.ndarray:
    """Class indices (N,) or multi-hot (N, C) -> uint64 bitmasks (N, ceil(C/64)); relevance is a non-empty AND."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        n_classes = int(labels.max()) + 1 if labels.size else 1
        multi_hot = np.zeros((len(labels), n_classes), dtype=bool)
        multi_hot[np.arange(len(labels)), labels] = True
    else:
        multi_hot = labels.astype(bool)
    return to_words(np.packbits(multi_hot, axis=1), max(8, multi_hot.shape[1]))


def _kernel():
    from latenthash import kernels  # lazy: numba compiles on first use

    return kernels.hamming_ranking_stats


@dataclass
class RetrievalReport:
    map_all: float
    map_at_k: float
    k: int
    ks: tuple[int, ...]
    precision_at_k: np.ndarray  # (len(ks),)
    precision_by_radius: np.ndarray  # (bits + 1,) mean precision within radius r
    recall_by_radius: np.ndarray  # (bits + 1,)

    @property
    def precision_r2(self) -> float:
        return float(self.precision_by_radius[min(2, len(self.precision_by_radius) - 1)])


def hamming_retrieval(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                      db_labels: np.ndarray, *, bits: int, k: int = 1000,
                      ks: tuple[int, ...] = DEFAULT_KS) -> RetrievalReport:
    """Every metric of the Hamming ranking of packed `db_codes` for each packed query code."""
    qmask, dmask = label_masks_pair(query_labels, db_labels)
    ks_arr = np.asarray([x for x in ks if x <= len(db_codes)] or [len(db_codes)], dtype=np.int64)
    ap_all, ap_k, hits, rel_r, tot_r = _kernel()(
        to_words(query_codes, bits), to_words(db_codes, bits), qmask, dmask, ks_arr, np.int64(k), np.int64(bits))
    cum_rel, cum_tot = np.cumsum(rel_r, axis=1), np.cumsum(tot_r, axis=1)
    n_rel = cum_rel[:, -1:]
    precision = np.divide(cum_rel, cum_tot, out=np.zeros(cum_rel.shape), where=cum_tot > 0)
    recall = np.divide(cum_rel, n_rel, out=np.zeros(cum_rel.shape), where=n_rel > 0)
    return RetrievalReport(float(ap_all.mean()), float(ap_k.mean()), k, tuple(int(x) for x in ks_arr),
                           hits.mean(axis=0) / ks_arr, precision.mean(axis=0), recall.mean(axis=0))


def label_masks_pair(query_labels: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks for queries and database built over the same class set."""
    q, d = np.asarray(query_labels), np.asarray(db_labels)
    if q.ndim == 1:
        n = int(max(q.max(initial=0), d.max(initial=0))) + 1
        q, d = np.eye(n, dtype=bool)[q], np.eye(n, dtype=bool)[d]
    return label_masks(q), label_masks(d)


def ranked_retrieval(scores: np.ndarray | None, query_labels: np.ndarray, db_labels: np.ndarray, *,
                     k: int = 1000, ks: tuple[int, ...] = DEFAULT_KS, order: np.ndarray | None = None
                     ) -> tuple[float, float, np.ndarray]:
    """(mAP over the database, mAP@k, precision at ks) for a real-valued ranking (higher score = better), e.g. the
    exhaustive cosine "linear search". Pass `order` (Q, N) instead of scores for a ranking computed elsewhere."""
    qmask, dmask = label_masks_pair(query_labels, db_labels)
    if order is None:
        order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    rel = np.any(qmask[:, None, :] & dmask[order], axis=2)
    ranks = np.arange(1, rel.shape[1] + 1)
    cum = np.cumsum(rel, axis=1)
    prec = cum / ranks
    n_rel = rel.sum(axis=1)
    ap_all = np.divide((prec * rel).sum(axis=1), n_rel, out=np.zeros(len(rel)), where=n_rel > 0)
    top = min(k, rel.shape[1])
    n_rel_k = rel[:, :top].sum(axis=1)
    ap_k = np.divide((prec[:, :top] * rel[:, :top]).sum(axis=1), n_rel_k, out=np.zeros(len(rel)), where=n_rel_k > 0)
    ks_arr = np.asarray([x for x in ks if x <= rel.shape[1]], dtype=np.int64)
    return float(ap_all.mean()), float(ap_k.mean()), (cum[:, ks_arr - 1] / ks_arr).mean(axis=0)


def cosine_linear_search(query_features: np.ndarray, db_features: np.ndarray, query_labels: np.ndarray,
                         db_labels: np.ndarray, *, k: int = 1000, ks: tuple[int, ...] = DEFAULT_KS,
                         chunk: int = 256) -> tuple[float, float, np.ndarray]:
    """The paper's linear search: exhaustive cosine ranking of float features, in query chunks to bound memory."""
    q = _l2n(query_features)
    d = _l2n(db_features)
    parts = [ranked_retrieval(q[i:i + chunk] @ d.T, query_labels[i:i + chunk], db_labels, k=k, ks=ks)
             for i in range(0, len(q), chunk)]
    w = np.asarray([min(chunk, len(q) - i) for i in range(0, len(q), chunk)], dtype=np.float64) / len(q)
    return (float(sum(p[0] * wi for p, wi in zip(parts, w))), float(sum(p[1] * wi for p, wi in zip(parts, w))),
            sum(p[2] * wi for p, wi in zip(parts, w)))


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
