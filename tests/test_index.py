import json
import threading
import time

import numpy as np
import pytest

import latenthash
from latenthash import HashIndex, open_index
from latenthash.codes import pack_codes
from latenthash.errors import IndexCorrupt, InvalidInput, ModelMismatch, NotFound, StorageFull

BITS, DIM = 48, 16


def make(rng, n=3000, dtype="float32"):
    codes = rng.random((n, BITS)) < 0.5
    feats = rng.standard_normal((n, DIM)).astype(np.float32)
    index = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype=dtype)
    ids = np.arange(n, dtype=np.int64) * 10 + 7
    index.add(ids, codes, feats, metadata=[{"label": int(i % 10)} for i in range(n)])
    return index, ids, codes, feats


def brute(codes, q, k):
    d = (codes[None, :, :] != q[:, None, :]).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1)


def test_plain_hamming_search_matches_brute_force(rng):
    index, ids, codes, _ = make(rng)
    q = rng.random((5, BITS)) < 0.5
    res = index.search(q, k=20)
    order, dist = brute(codes, q, 20)
    np.testing.assert_array_equal(res.ids, ids[order])
    np.testing.assert_array_equal(res.distances, dist)
    assert res.scores is None and res.ids.shape == (5, 20)
    one = index.search(q[0], k=20)  # one query or a batch alike
    np.testing.assert_array_equal(one.ids[0], res.ids[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_two_step_search(rng, dtype):
    index, ids, codes, feats = make(rng, dtype=dtype)
    q, qf = codes[:4], feats[:4] + 0.01 * rng.standard_normal((4, DIM)).astype(np.float32)
    res = index.search(q, k=5, features=qf, pool=300)
    assert (res.ids[:, 0] == ids[:4]).all()  # the item itself: distance 0 and cosine ~1
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()
    order, dist = brute(codes, q, len(codes))
    fn = index.get(ids).features  # stored (quantized) features: the ranking must follow them exactly
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    for i in range(4):
        shells = order[i][dist[i] <= dist[i, 299]]  # the pool: whole distance shells covering 300 items, no tie cut
        assert len(shells) > 300
        ref = shells[np.argsort(-(fn[shells] @ qn[i]), kind="stable")][:5]
        np.testing.assert_array_equal(res.ids[i], ids[ref])
    plain = index.search(q, k=5, features=qf, rerank=False)
    assert plain.scores is None


def test_radius_search(rng):
    index, ids, codes, _ = make(rng)
    q = codes[:3]
    res = index.search(q, k=10_000, radius=18)
    d = (codes[None] != q[:, None]).sum(-1)
    for i in range(3):
        ref = np.argsort(d[i], kind="stable")
        ref = ref[d[i, ref] <= 18]
        assert res.counts[i] == len(ref)
        np.testing.assert_array_equal(res.ids[i, :len(ref)], ids[ref])
    np.testing.assert_array_equal(index.radius_counts(q)[0], np.bincount(d[0], minlength=BITS + 1))


def test_add_replace_remove_get(rng):
    index, ids, codes, feats = make(rng, n=100)
    index.add([ids[5]], ~codes[5], feats[5], metadata=[{"label": "new"}])  # replace: same id, new item
    assert len(index) == 100
    got = index.get([ids[5]])
    assert got.metadata == [{"label": "new"}]
    np.testing.assert_array_equal(np.unpackbits(got.codes, axis=1)[:, :BITS].astype(bool), ~codes[5][None])
    assert index.remove([ids[0], ids[1], 999999]) == 2
    assert len(index) == 98 and ids[0] not in index
    with pytest.raises(NotFound, match="999999"):
        index.get([999999])
    assert index.metadata([ids[2], -1]) == [{"label": 2}, None]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_rounded_features_score_as_exact_cosines(rng, dtype):
    """Rounding a unit feature to float16 or int8 moves its norm; each row keeps the scale that makes it a unit
    vector again, so scores are exact cosines of what is stored, not noise of a few 1e-4 (the gap between
    neighbours near the k-th place)."""
    index, ids, codes, feats = make(rng, dtype=dtype)
    stored = index.get(ids).features
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)
    q, qf = codes[:3], feats[:3]
    res = index.search(q, k=5, features=qf, pool=len(ids))
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    rows = {int(i): r for r, i in enumerate(ids)}
    for i in range(3):
        want = np.array([stored[rows[int(h)]] @ qn[i] for h in res.ids[i]], np.float32)
        np.testing.assert_allclose(res.scores[i], want, atol=1e-6)


def test_float16_index_saved_without_row_scales_opens_with_them(rng, tmp_path):
    """An index saved before float16 rows carried scales (no scales.npy) opens with them computed."""
    from latenthash.generations import write_generation

    index, ids, codes, feats = make(rng, dtype="float16")
    snap = index._snap
    n = snap.n
    header = {"bits": BITS, "feature_dim": DIM, "feature_dtype": "float16", "count": n,
              "code_layout": "uint64-le-words", "model": {}}
    (tmp_path / "old").mkdir()
    write_generation(tmp_path / "old", {"codes": snap.words[:n], "ids": snap.ids[:n],
                                        "features": snap.features[:n]}, snap.metadata[:n], header)
    old = HashIndex.open(tmp_path / "old", warmup=False)
    np.testing.assert_array_equal(old._snap.scales, snap.scales[:n])
    q, qf = codes[:4], feats[:4]
    np.testing.assert_array_equal(old.search(q, k=10, features=qf).ids, index.search(q, k=10, features=qf).ids)


def test_persistence_round_trip_and_corruption(rng, tmp_path):
    index, ids, codes, feats = make(rng, dtype="float16")
    index.model_info = {"bits": BITS, "name": "test"}
    q, qf = codes[:6], feats[:6]
    before = index.search(q, k=10, features=qf)
    index.save(tmp_path / "ix")
    opened = latenthash.HashIndex.open(tmp_path / "ix")
    after = opened.search(q, k=10, features=qf)
    np.testing.assert_array_equal(before.ids, after.ids)
    # until its background warmup ends, an opened index answers through numpy: the same hits, scores summed in
    # another order (equal to float32 rounding)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6, atol=1e-6)
    assert opened.get([ids[3]]).metadata == [{"label": 3}]
    assert opened.stats()["model"]["name"] == "test"
    assert isinstance(open_index(str(tmp_path / "ix")), HashIndex)
    # writes after open go to memory, a second save makes a new generation and removes the old one
    opened.add([1], codes[:1], feats[:1])
    opened.save()
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["CURRENT", "LOCK", "gen-2"]
    assert len(HashIndex.open(tmp_path / "ix")) == len(ids) + 1
    # flipped byte -> checksum error; truncation -> size error; garbage header -> clear error
    gen = tmp_path / "ix" / "gen-2"
    good = (gen / "codes.npy").read_bytes()
    (gen / "codes.npy").write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(IndexCorrupt, match="checksum"):
        HashIndex.open(tmp_path / "ix")
    assert len(HashIndex.open(tmp_path / "ix", verify=False)) == len(ids) + 1  # sizes still match
    (gen / "codes.npy").write_bytes(good)
    (gen / "ids.npy").write_bytes(b"short")
    with pytest.raises(IndexCorrupt, match="truncated"):
        HashIndex.open(tmp_path / "ix")
    (gen / "header.json").write_text("{not json")
    with pytest.raises(IndexCorrupt, match="header.json fails its checksum"):  # CURRENT names the header's sha256
        HashIndex.open(tmp_path / "ix")
    set_header(tmp_path / "ix", "{not json")
    with pytest.raises(IndexCorrupt, match="cannot be read"):
        HashIndex.open(tmp_path / "ix")
    set_header(tmp_path / "ix", json.dumps({"format": "latenthash-index", "version": 99}))
    with pytest.raises(IndexCorrupt, match="version 99"):
        HashIndex.open(tmp_path / "ix")
    with pytest.raises(NotFound):
        HashIndex.open(tmp_path / "nothing")


def set_header(root, text: str) -> None:
    """Replace an index's header and name its checksum in CURRENT, as a save would: damage past the checksum."""
    import hashlib

    gen = (root / "CURRENT").read_text().split()[0]
    (root / gen / "header.json").write_text(text)
    (root / "CURRENT").write_text(f"{gen}\nheader-sha256 {hashlib.sha256(text.encode()).hexdigest()}\n")


@pytest.mark.parametrize("damage", ["no files", "bad utf-8", "random codes", "offset out of range", "bad bits",
                                    "bad CURRENT"])
def test_damaged_index_files_raise_index_corrupt(rng, tmp_path, damage):
    """Every way a damaged index was seen to fail (KeyError, UnicodeDecodeError, ValueError, silent success) is
    IndexCorrupt naming the file; verify=False skips only the content checksums, not the structure."""
    index, ids, codes, feats = make(rng, n=50)
    root = tmp_path / "ix"
    index.save(root)
    gen = root / (root / "CURRENT").read_text().split()[0]
    header = json.loads((gen / "header.json").read_text())
    if damage == "no files":
        del header["files"]
    elif damage == "bad utf-8":
        blob = bytearray((gen / "metadata.bin").read_bytes())
        blob[2] = 0xFF
        (gen / "metadata.bin").write_bytes(bytes(blob))
    elif damage == "random codes":
        size = header["files"]["codes.npy"]["size"]
        (gen / "codes.npy").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    elif damage == "offset out of range":
        offsets = np.load(gen / "metadata_offsets.npy")
        offsets[-1] += 1000
        np.save(gen / "metadata_offsets.npy", offsets)
    elif damage == "bad bits":
        header["bits"] = 0
    else:
        (root / "CURRENT").write_text("../elsewhere")
    if damage != "bad CURRENT":
        set_header(root, json.dumps(header))
    with pytest.raises(IndexCorrupt):
        HashIndex.open(root, verify=False)


def test_interrupted_save_leaves_previous_version(rng, tmp_path, monkeypatch):
    index, ids, codes, feats = make(rng, n=200)
    index.save(tmp_path / "ix")
    index.add([123456], codes[:1], feats[:1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("latenthash.index.os.replace", crash)  # dies before CURRENT switches
    with pytest.raises(StorageFull, match="cannot save the index .*disk full"):
        index.save()
    monkeypatch.undo()
    reopened = HashIndex.open(tmp_path / "ix")
    assert len(reopened) == 200 and 123456 not in reopened


def test_searches_never_see_half_written_items(rng):
    """Writers add and remove batches while readers search; every hit must be a complete item: its stored code
    at the reported distance and its feature giving the reported score."""
    index, ids, codes, feats = make(rng, n=2000)
    q, qf = codes[:8], feats[:8]
    stop, errors = threading.Event(), []

    def writer():
        w_rng = np.random.default_rng(7)
        next_id = 10**9
        while not stop.is_set():
            c = w_rng.random((50, BITS)) < 0.5
            f = w_rng.standard_normal((50, DIM)).astype(np.float32)
            new_ids = np.arange(next_id, next_id + 50)
            index.add(new_ids, c, f)
            index.remove(new_ids[::2])
            next_id += 50

    def reader():
        try:
            for _ in range(40):
                res = index.search(q, k=10, features=qf, pool=200)
                for i in range(len(q)):
                    for id_, dist, score, _ in res.hits(i):
                        try:  # one call: a check-then-get would race the writer's removals
                            item = index.get([id_])
                        except NotFound:
                            continue  # removed since: fine (ids are never reused, so content cannot change)
                        code = np.unpackbits(item.codes[0])[:BITS].astype(bool)
                        assert (code != q[i]).sum() == dist
                        fn = qf[i] / np.linalg.norm(qf[i])
                        assert abs(float(item.features[0] @ fn) - score) < 1e-4
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors[0]


@pytest.mark.parametrize("call, match", [
    (lambda ix: ix.search(np.zeros((1, 47), bool)), "do not fit"),
    (lambda ix: ix.search(np.zeros((1, BITS), bool), k=0), "k must be"),
    (lambda ix: ix.search(np.zeros((1, BITS), bool), radius=BITS + 1), "radius"),
    (lambda ix: ix.search(np.zeros((1, BITS), bool), features=np.ones((1, DIM + 1))), "shape"),
    (lambda ix: ix.search(np.zeros((1, BITS), bool), rerank=True), "features"),
    (lambda ix: ix.search(np.zeros((1, BITS), bool), features=np.full((1, DIM), np.inf)), "infinite"),
    (lambda ix: ix.add([1, 2], np.zeros((1, BITS), bool), np.ones((1, DIM))), "ids but"),
    (lambda ix: ix.add([1], np.zeros((1, BITS), bool)), "features="),
    (lambda ix: ix.add([1], np.zeros((1, BITS), bool), np.full((1, DIM), np.nan)), "NaN"),
    (lambda ix: ix.add([1, 1], np.zeros((2, BITS), bool), np.ones((2, DIM))), "unique"),
    (lambda ix: ix.add([1], np.zeros((1, BITS), bool), np.ones((1, DIM)), metadata=[{1j}]), "JSON"),
    (lambda ix: ix.add(["a"], np.zeros((1, BITS), bool), np.ones((1, DIM))), "integers"),
])
def test_bad_input_is_a_clear_error(rng, call, match):
    index, *_ = make(rng, n=10)
    with pytest.raises((InvalidInput, ModelMismatch), match=match):
        call(index)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_add_rejects_non_finite_features_on_the_compiled_path(rng, bad):
    """Once warmed, float16 rows are normalized and rounded in one kernel pass: it still refuses NaN and infinity,
    in the same words, before anything is stored."""
    from latenthash import kernels

    index, *_ = make(rng, n=10, dtype="float16")
    index.warmup()
    assert kernels.unit_half_rows.overloads  # the one-pass path is the one taken
    f = np.ones((2, DIM), np.float32)
    f[1, 3] = bad
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        index.add([100, 101], np.zeros((2, BITS), bool), f)
    assert len(index) == 10 and 100 not in index


def test_empty_index_search(rng):
    index = HashIndex(bits=BITS)
    res = index.search(np.zeros((2, BITS), bool), k=3)
    assert res.counts.tolist() == [0, 0]


def test_code_buckets_give_the_scan_results_and_follow_changes(rng):
    from latenthash import buckets

    bits, n = 48, buckets.MIN_ROWS + 5000
    words = pack_codes(rng.random((60, bits)) < 0.5, bits)
    codes = words[rng.integers(0, 60, n)]  # learned codes collapse onto few codewords
    index = HashIndex(bits=bits)
    index.add(np.arange(n), codes)
    queries = np.concatenate([words[:4], pack_codes(rng.random((4, bits)) < 0.5, bits)])

    def brute(k):
        dist = np.bitwise_count(queries[:, None, :] ^ index.get(index.ids).codes[None]).sum(-1)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return index.ids[order], np.take_along_axis(dist, order, 1)

    scanned = index.search(queries, k=500)
    index.warmup()  # groups the rows by code
    assert index._buckets.get(index._snap) is not None
    for k in (1, 500, 3000):
        res, (ids, dist) = index.search(queries, k=k), brute(k)
        np.testing.assert_array_equal(res.ids, ids)
        np.testing.assert_array_equal(res.distances, dist)
    np.testing.assert_array_equal(index.search(queries, k=500).ids, scanned.ids)
    np.testing.assert_array_equal(index.search(queries[0], k=500).ids, scanned.ids[:1])
    # a write publishes a new snapshot: the stale buckets are never used, and new ones are built in the background
    index.add([n + 1, 3], words[:2])
    index.remove([10, 11])
    res, (ids, dist) = index.search(queries, k=800), brute(800)
    np.testing.assert_array_equal(res.ids, ids)
    for _ in range(200):
        if index._buckets.get(index._snap) is not None:
            break
        time.sleep(0.05)
    assert index._buckets.get(index._snap) is not None
    res = index.search(queries, k=800)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_array_equal(res.distances, dist)


def test_bucketed_two_step_finds_what_the_scan_finds(rng):
    """Step 1 and 2 of a bucketed index (shells widened and cut by cells, a sketch pass, an exact re-score) against
    the scanned index (whole shells, every row re-scored): against the exact cosine top-10 over every item, the
    bucketed search's recall is at least the scan's for as many rows as the scan re-ranks, and its scores are exact
    and ordered."""
    from latenthash import buckets

    bits, dim, n = 48, 32, buckets.MIN_ROWS + 5000
    words = pack_codes(rng.random((60, bits)) < 0.5, bits)
    label = rng.integers(0, 60, n)
    centres = rng.standard_normal((60, dim)).astype(np.float32)
    feats = centres[label] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)  # features follow the codes
    index = HashIndex(bits=bits, feature_dim=dim, feature_dtype="float32")
    index.add(np.arange(n), words[label], feats)
    q = rng.integers(0, 60, 40)
    qf = centres[q] + 0.7 * rng.standard_normal((40, dim)).astype(np.float32)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    exact = np.argsort(-qn @ unit.T, axis=1)[:, :10]

    def recall(res):
        return np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(res.ids, exact)])

    scanned = {pool: index.search(words[q], k=10, features=qf, pool=pool) for pool in (300, 5000)}
    covered = np.cumsum(index.radius_counts(words[q]), axis=1)  # rows within each code distance of each query
    index.warmup()
    assert index._buckets.get(index._snap) is not None
    for pool in (300, 5000):
        # the scan re-ranks whole shells, the bucketed pool is cut to about `pool` rows: compare at the scan's rows
        shells = covered[np.arange(len(q)), np.argmax(covered >= pool, axis=1)]
        got = index.search(words[q], k=10, features=qf, pool=pool)
        same_rows = np.mean([len(np.intersect1d(index.search(words[q[i]], k=10, features=qf[i],
                                                             pool=int(shells[i])).ids[0], exact[i])) / 10
                             for i in range(len(q))])
        assert same_rows >= recall(scanned[pool]) - 0.01, (pool, same_rows, recall(scanned[pool]))
        np.testing.assert_allclose(got.scores, np.einsum("qkd,qd->qk", unit[got.ids], qn), rtol=1e-5, atol=1e-6)
        assert (got.scores[:, :-1] >= got.scores[:, 1:]).all()
    assert recall(index.search(words[q], k=10, features=qf, pool=5000)) >= 0.95


def test_one_query_in_any_form_gets_the_same_answer(rng):
    """A bucketed index answers the common query form (one packed uint8 code, float32 features, plain int k and
    pool) in one compiled call that makes the code's words and normalizes the features itself; every other form
    goes through the general conversions. All forms, and the query as a row of a batch, get the same hits and
    scores; NaN or infinite features are refused on either path with the same message."""
    from latenthash import buckets

    bits, dim, n = 48, 32, buckets.MIN_ROWS + 3000
    words = pack_codes(rng.random((40, bits)) < 0.5, bits)
    label = rng.integers(0, 40, n)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    index = HashIndex(bits=bits, feature_dim=dim)
    index.add(np.arange(n), words[label], centres[label] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32))
    index.warmup()
    assert index._buckets.get(index._snap) is not None
    q = rng.integers(0, 40, 6)
    codes = words[q]
    feats = (3 * centres[q] + 2 * rng.standard_normal((6, dim))).astype(np.float32)  # not unit length
    batch = index.search(codes, k=10, features=feats, pool=600)
    for i in range(len(q)):
        readonly = np.frombuffer(codes[i].tobytes(), np.uint8)
        forms = [(codes[i], feats[i], True), (readonly, feats[i], True),
                 (codes[i:i + 1], feats[i:i + 1], False),
                 (np.unpackbits(codes[i]).astype(bool), feats[i].astype(np.float64).tolist(), False)]
        for code, f, fast in forms:
            assert (index._one_query(code, f, 10, 600) is not None) == fast
            got = index.search(code, k=10, features=f, pool=600)
            np.testing.assert_array_equal(got.ids[0], batch.ids[i])
            np.testing.assert_array_equal(got.distances[0], batch.distances[i])
            np.testing.assert_allclose(got.scores[0], batch.scores[i], rtol=1e-6)
    for bad in (np.nan, np.inf):
        f = feats[0].copy()
        f[5] = bad
        for code, form in ((codes[0], f), (codes[:1], f[None])):
            with pytest.raises(InvalidInput, match="NaN or infinite"):
                index.search(code, k=10, features=form)
    for k, pool in ((np.int64(10), None), (10, np.int64(600))):  # numpy integers: the general path, same hits
        np.testing.assert_array_equal(index.search(codes[0], k=k, features=feats[0], pool=pool or 600).ids,
                                      batch.ids[:1])
    for k, pool, match in ((0, None, "k must"), (True, None, "k must"), (10, 0, "pool must")):
        with pytest.raises(InvalidInput, match=match):
            index.search(codes[0], k=k, features=feats[0], pool=pool)


def test_embedded_api_edge_cases_are_clear(rng):
    """What raised raw exceptions or returned odd shapes before: zero-row queries, string features, metadata that
    is a string, NaN, too deep or too large; results are always (queries, k), whatever the index holds."""
    from latenthash.limits import MAX_METADATA_BYTES, MAX_METADATA_DEPTH

    index, ids, codes, feats = make(rng, n=5)
    empty = index.search(np.zeros((0, 6), np.uint8), k=4)
    assert empty.ids.shape == (0, 4) and empty.counts.shape == (0,)
    assert index.search(np.zeros((0, 6), np.uint8), k=4, features=np.zeros((0, feats.shape[1]))).scores.shape == (0, 4)
    for hamming_only in (True, False):
        res = index.search(codes[:2], k=8, features=None if hamming_only else feats[:2])
        assert res.ids.shape == (2, 8) and list(res.counts) == [5, 5]
        assert (res.ids[:, 5:] == -1).all() and (res.distances[:, 5:] == -1).all()
    nothing = HashIndex(bits=BITS, feature_dim=feats.shape[1])
    res = nothing.search(codes[:1], k=3)
    assert res.ids.shape == (1, 3) and res.counts[0] == 0 and (res.ids == -1).all()
    with pytest.raises(InvalidInput, match="numbers"):
        index.search(codes[:1], k=3, features=["a"] * feats.shape[1])
    with pytest.raises(InvalidInput, match="one entry per id"):
        index.add([100, 101, 102], codes[:3], feats[:3], metadata="abc")
    with pytest.raises(InvalidInput, match="NaN"):
        index.add([100], codes[:1], feats[:1], metadata=[{"x": float("nan")}])
    deep: list = []
    for _ in range(MAX_METADATA_DEPTH):
        deep = [deep]
    with pytest.raises(InvalidInput, match="levels deep"):
        index.add([100], codes[:1], feats[:1], metadata=[deep])
    very_deep: list = []
    for _ in range(5000):
        very_deep = [very_deep]
    with pytest.raises(InvalidInput, match="deeper"):
        index.add([100], codes[:1], feats[:1], metadata=[very_deep])
    with pytest.raises(InvalidInput, match="MAX_METADATA_BYTES"):
        index.add([100], codes[:1], feats[:1], metadata=["x" * MAX_METADATA_BYTES])
    assert 100 not in index and len(index) == 5  # nothing refused was stored
    index.add([100], codes[:1], feats[:1], metadata=[{"ok": [[1]]}])
    assert index.metadata([100]) == [{"ok": [[1]]}]
