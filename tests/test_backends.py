"""The index seam: every backend implements the whole `IndexBackend` Protocol with the same behaviour at its edges
(limits, ids, model_info, save, close). Answers to searches are compared backend against backend in
tests/test_milvus.py (the congruence suite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from extras import need

from latenthash import HashIndex, open_index
from latenthash.backend import IndexBackend
from latenthash.errors import InvalidInput
from latenthash.limits import MAX_K

BITS, DIM = 64, 8


@pytest.fixture(params=["embedded", "embedded-saved", "milvus-lite"])
def backend(request, tmp_path):
    if request.param == "milvus-lite":
        need("milvus_lite", "milvus")
        index = open_index(f"milvus-lite://{tmp_path}/b.db/items", bits=BITS, feature_dim=DIM, create=True)
    elif request.param == "embedded-saved":
        index = open_index(tmp_path / "ix", bits=BITS, feature_dim=DIM, create=True)
    else:
        index = HashIndex(bits=BITS, feature_dim=DIM)
    yield index
    index.close()


def test_every_backend_implements_the_whole_protocol(backend, rng):
    assert isinstance(backend, IndexBackend)
    for name in ("bits", "feature_dim", "max_k", "model_info", "path", "ids"):
        getattr(backend, name)
    assert (backend.bits, backend.feature_dim) == (BITS, DIM) and 1 <= backend.max_k <= MAX_K
    codes = np.packbits(rng.integers(0, 2, (5, BITS), dtype=np.uint8), axis=1)
    feats = rng.standard_normal((5, DIM)).astype(np.float32)
    backend.add([9, 3, 7, 1, 5], codes, feats, [{"a": i} for i in range(5)])
    np.testing.assert_array_equal(np.sort(backend.ids), [1, 3, 5, 7, 9])
    assert len(backend) == 5 and 7 in backend and 8 not in backend
    assert backend.metadata([3, -1]) == [{"a": 1}, None]
    assert [json.loads(t) if t else t for t in backend.metadata_json([5, 4])] == [{"a": 4}, None]
    backend.model_info = {"bits": BITS, "precision": "int8"}
    stats = backend.stats()
    assert stats["count"] == 5 and stats["model"]["precision"] == "int8"
    if backend.path is not None:  # an in-memory index has nowhere to save (save() says so)
        assert backend.save() is not None
    assert backend.warmup() >= 0


def test_every_backend_enforces_its_own_k_limit(backend, rng):
    codes = np.packbits(rng.integers(0, 2, (1, BITS), dtype=np.uint8), axis=1)
    backend.add([1], codes, rng.standard_normal((1, DIM)).astype(np.float32))
    assert backend.search(codes, backend.max_k).ids.shape == (1, backend.max_k)
    with pytest.raises(InvalidInput, match=f"1 to {backend.max_k}"):
        backend.search(codes, backend.max_k + 1)


def test_search_many_answers_each_request_as_its_own_search(rng):
    """What the server calls: mixed options, a labelled request and a bad one in one list; each answer equals the
    request searched alone, and the bad request fails alone."""
    from latenthash.api import Query, SearchOptions
    from latenthash.search import Searcher

    index = HashIndex(bits=BITS, feature_dim=DIM)
    codes = np.packbits(rng.integers(0, 2, (300, BITS), dtype=np.uint8), axis=1)
    feats = rng.standard_normal((300, DIM)).astype(np.float32)
    index.add(np.arange(300), codes, feats, [{"label": str(i % 3)} for i in range(300)])
    searcher = Searcher(index)
    requests = [(codes[:2], feats[:2], {"k": 5}), (codes[2:3], None, {"k": 5}), (codes[3:4], feats[3:4], {"k": 5}),
                (codes[4:5], feats[4:5], {"k": 7, "label": "1"}), (codes[5:6], feats[5:6, :3], {"k": 5}),
                (codes[6:7], None, {"k": 3, "radius": 20})]
    got = searcher.search_many([Query(c, f, options=SearchOptions(**o)) for c, f, o in requests])
    assert isinstance(got[4], InvalidInput)
    for (c, f, options), res in zip(requests, got):
        if isinstance(res, Exception):
            continue
        alone = searcher.search(codes=c, features=f, metadata=False, **options)
        for a, b in ((alone.ids, res.ids), (alone.distances, res.distances)):
            np.testing.assert_array_equal(a[:, :b.shape[1]], b)
        np.testing.assert_array_equal(alone.counts, res.counts)


def test_label_filter_keeps_the_first_matches_in_rank_order(rng):
    """Label search reads metadata a block at a time: matches beyond the first block, and fewer than k, still come
    back exactly as filtering the whole ranked pool would give them."""
    from latenthash.search import Searcher

    index = HashIndex(bits=BITS, feature_dim=DIM)
    n = 2000
    codes = np.packbits(rng.integers(0, 2, (n, BITS), dtype=np.uint8), axis=1)
    feats = rng.standard_normal((n, DIM)).astype(np.float32)
    rare = set(rng.choice(n, 3, replace=False).tolist())
    index.add(np.arange(n), codes, feats, [{"label": "rare" if i in rare else "common"} for i in range(n)])
    searcher = Searcher(index)
    full = index.search(codes[:1], n, features=feats[:1], pool=n)
    for label, k in (("rare", 5), ("common", 300)):
        want = [i for i in full.ids[0].tolist() if ("rare" if i in rare else "common") == label][:k]
        got = searcher.search(codes=codes[:1], features=feats[:1], k=k, pool=n, label=label, metadata=False)
        assert got.ids[0, :got.counts[0]].tolist() == want
