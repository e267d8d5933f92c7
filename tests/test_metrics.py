import numpy as np
import pytest

from latenthash.codes import pack_codes, to_words
from latenthash.metrics import cosine_linear_search, hamming_retrieval, ranked_retrieval


def brute_hamming_metrics(q, db, ql, dl, bits, k, ks, multilabel=False):
    """Straight from the definitions: stable sort by distance, then AP, AP@k, P@k, P within radius."""
    dist = np.bitwise_count(to_words(q, bits)[:, None, :] ^ to_words(db, bits)[None]).sum(-1)
    aps, apks, pks, pr2 = [], [], [], []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")
        rel = (ql[i] & dl[order]).any(1) if multilabel else dl[order] == ql[i]
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append((prec * rel).sum() / rel.sum() if rel.sum() else 0.0)
        apks.append((prec[:k] * rel[:k]).sum() / rel[:k].sum() if rel[:k].sum() else 0.0)
        pks.append([rel[:kk].mean() for kk in ks])
        within = dist[i][order] <= 2
        pr2.append(rel[within].mean() if within.any() else 0.0)
    return np.mean(aps), np.mean(apks), np.mean(pks, 0), np.mean(pr2)


@pytest.mark.parametrize("bits", [8, 12, 48])
def test_hamming_metrics_match_definitions(rng, bits):
    # few bits -> many ties and empty radius-2 balls: the tie rule and the zero rule both matter
    db = pack_codes(rng.random((800, bits)) < 0.5, bits)
    q = pack_codes(rng.random((40, bits)) < 0.5, bits)
    dl, ql = rng.integers(0, 5, 800), rng.integers(0, 6, 40)  # class 5: queries without relevant items
    ks = (1, 10, 100)
    rep = hamming_retrieval(q, db, ql, dl, bits=bits, k=100, ks=ks)
    m, mk, pk, p2 = brute_hamming_metrics(q, db, ql, dl, bits, 100, ks)
    assert rep.map_all == pytest.approx(m, abs=1e-12)
    assert rep.map_at_k == pytest.approx(mk, abs=1e-12)
    np.testing.assert_allclose(rep.precision_at_k, pk)
    assert rep.precision_r2 == pytest.approx(p2, abs=1e-12)
    assert rep.recall_by_radius[-1] == pytest.approx(np.mean([(dl == c).any() for c in ql]))


def test_multilabel_relevance_is_a_shared_label(rng):
    bits = 16
    db = pack_codes(rng.random((300, bits)) < 0.5, bits)
    q = pack_codes(rng.random((20, bits)) < 0.5, bits)
    dl, ql = rng.random((300, 7)) < 0.2, rng.random((20, 7)) < 0.3
    rep = hamming_retrieval(q, db, ql, dl, bits=bits, k=50, ks=(5, 50))
    m, mk, pk, _ = brute_hamming_metrics(q, db, ql, dl, bits, 50, (5, 50), multilabel=True)
    assert rep.map_all == pytest.approx(m) and rep.map_at_k == pytest.approx(mk)
    np.testing.assert_allclose(rep.precision_at_k, pk)


def test_map_agrees_with_scikit_learn_on_tie_free_scores(rng):
    from sklearn.metrics import average_precision_score

    scores = rng.standard_normal((30, 500))  # continuous: no ties
    dl, ql = rng.integers(0, 4, 500), rng.integers(0, 4, 30)
    m, _, _ = ranked_retrieval(scores, ql, dl, k=500)
    ref = np.mean([average_precision_score(dl == ql[i], scores[i]) for i in range(30)])
    assert m == pytest.approx(ref, abs=1e-12)


def test_linear_search_matches_brute_force(rng):
    """Exhaustive cosine retrieval against its definition: rank by cosine, AP per query, precision at k."""
    f = rng.standard_normal((300, 8)).astype(np.float32) * rng.uniform(0.1, 10, (300, 1)).astype(np.float32)
    qf = rng.standard_normal((20, 8)).astype(np.float32)
    dl, ql = rng.integers(0, 3, 300), rng.integers(0, 3, 20)
    m_all, _, prec = cosine_linear_search(qf, f, ql, dl, chunk=6, ks=(1, 10))
    cos = (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (f / np.linalg.norm(f, axis=1, keepdims=True)).T
    aps, p10 = [], []
    for i in range(20):
        rel = dl[np.argsort(-cos[i], kind="stable")] == ql[i]
        hits = np.cumsum(rel)
        aps.append((hits[rel] / (np.flatnonzero(rel) + 1)).mean())
        p10.append(rel[:10].mean())
    assert m_all == pytest.approx(np.mean(aps), abs=1e-9)
    assert prec[1] == pytest.approx(np.mean(p10), abs=1e-9)


def test_linear_search_chunks_agree(rng):
    f = rng.standard_normal((400, 8)).astype(np.float32)
    qf = rng.standard_normal((50, 8)).astype(np.float32)
    dl, ql = rng.integers(0, 3, 400), rng.integers(0, 3, 50)
    a = cosine_linear_search(qf, f, ql, dl, chunk=7, ks=(1, 10))
    b = cosine_linear_search(qf, f, ql, dl, chunk=1000, ks=(1, 10))
    assert a[0] == pytest.approx(b[0]) and a[1] == pytest.approx(b[1])
    np.testing.assert_allclose(a[2], b[2])
