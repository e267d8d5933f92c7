"""Every Numba kernel against a brute-force numpy reference, on random codes and on codes of real images
(LSH of Fashion-MNIST pixels: clustered, with many ties, as real hash codes are)."""

import itertools

import numpy as np
import pytest

from latenthash import kernels as K
from latenthash.codes import from_words, pack_codes, to_words
from latenthash.export.evaluate import lsh_codes


def brute_distances(q_words, db_words):
    return np.bitwise_count(q_words[:, None, :] ^ db_words[None, :, :]).sum(-1).astype(np.int64)


def random_codes(rng, n, bits):
    return pack_codes(rng.random((n, bits)) < 0.5, bits)


@pytest.fixture(scope="module")
def real_codes(fashion):
    x = fashion.train.images[:6000].reshape(6000, -1).astype(np.float32) / 255
    db, q = lsh_codes(x[:5000], x[5000:5040], 48)
    return db, q


def check_topk(db, qs, bits, k):
    dw, qw = to_words(db, bits), to_words(qs, bits)
    dist = brute_distances(qw, dw)
    ref = np.argsort(dist, axis=1, kind="stable")[:, :k]  # ties by database order
    n, w = len(dw), dw.shape[1]
    for chunks in (1, 3):
        for i in range(len(qw)):
            ids, d, count = K.topk_single(dw.ravel(), n, w, qw[i], min(k, n), bits, chunks)
            assert count[0] == min(k, n)
            np.testing.assert_array_equal(ids[0], ref[i])
            np.testing.assert_array_equal(d[0], dist[i, ref[i]])
    kk = min(k, n)
    row_ids = np.arange(n, dtype=np.int64)[::-1] * 7 + 3  # the index's one-query call maps rows to these
    for i in range(len(qw)):
        ids, d, count = K.topk_one(dw.ravel(), n, w, qw[i], k, bits, 1 + i % 3, row_ids)
        assert ids.shape == d.shape == (1, k) and count[0] == kk
        np.testing.assert_array_equal(ids[0, :kk], row_ids[ref[i, :kk]])
        np.testing.assert_array_equal(d[0, :kk], dist[i, ref[i, :kk]])
        assert (ids[0, kk:] == -1).all() and (d[0, kk:] == -1).all()
    ids, d = K.topk_batch(dw.ravel(), n, w, qw.ravel(), k, bits, 2)
    np.testing.assert_array_equal(ids[:, :kk], ref)
    np.testing.assert_array_equal(d[:, :kk], np.take_along_axis(dist, ref, 1))
    assert (ids[:, kk:] == -1).all()


@pytest.mark.parametrize("bits", [8, 16, 48, 64, 100, 128, 256])
@pytest.mark.parametrize("k", [1, 10, 257])
def test_topk_random(rng, bits, k):
    check_topk(random_codes(rng, 3000, bits), random_codes(rng, 6, bits), bits, k)


def test_topk_k_beyond_n(rng):
    check_topk(random_codes(rng, 50, 64), random_codes(rng, 3, 64), 64, 80)


@pytest.mark.parametrize("k", [1, 100, 1000])
def test_topk_real_codes_with_ties(real_codes, k):
    db, q = real_codes
    check_topk(db, q, 48, k)


@pytest.mark.parametrize("chunks", [2, 7])
def test_chunks_keep_ties_in_order(rng, chunks):
    """One query whose first pass is split into chunks, with codes that tie heavily (the nearest codeword in every
    chunk, k beyond a chunk's size): the result must still be the scan's, ties by row."""
    words = random_codes(rng, 6, 48)
    db = words[rng.integers(0, 6, 20_000)]
    dw, qw = to_words(db, 48), to_words(np.concatenate([words[:2], random_codes(rng, 2, 48)]), 48)
    dist = brute_distances(qw, dw)
    for k in (1, 50, 3000, 9000):
        ref = np.argsort(dist, axis=1, kind="stable")[:, :k]
        for i in range(len(qw)):
            ids, d, count = K.topk_single(dw.ravel(), len(dw), 1, qw[i], k, 48, chunks)
            assert count[0] == k
            np.testing.assert_array_equal(ids[0], ref[i])
            np.testing.assert_array_equal(d[0], dist[i, ref[i]])


@pytest.mark.parametrize("kind", ["random", "tied"])
def test_bound_from_group_minima(rng, kind):
    """More groups than k: both kernels first bound the threshold by the k-th smallest group minimum (over all
    chunks of one query; per query in a batch, whose rounds of queries share blocks) and then read only the groups
    below it. Heavily tied codes put many groups exactly at the bound."""
    n, bits = 70_000, 64
    if kind == "random":
        db = random_codes(rng, n, bits)
    else:
        words = random_codes(rng, 40, bits)
        db = words[rng.integers(0, 40, n)]
        db[rng.random(n) < 0.3, 0] ^= np.uint8(1)  # one flipped bit on a third of them
    qs = np.concatenate([db[:2], random_codes(rng, 2, bits), db[rng.integers(0, n, 71)]])  # > 2 rounds of queries
    dw, qw = to_words(db, bits), to_words(qs, bits)
    dist = brute_distances(qw, dw)
    for k in (1, 100, 137):
        ref = np.argsort(dist, axis=1, kind="stable")[:, :k]
        for chunks in (1, 2):
            for i in range(4):
                ids, d, count = K.topk_single(dw.ravel(), n, 1, qw[i], k, bits, chunks)
                assert count[0] == k
                np.testing.assert_array_equal(ids[0], ref[i])
                np.testing.assert_array_equal(d[0], dist[i, ref[i]])
        for blocks in (1, 3):
            ids, d = K.topk_batch(dw.ravel(), n, 1, qw.ravel(), k, bits, blocks)
            np.testing.assert_array_equal(ids, ref)
            np.testing.assert_array_equal(d, np.take_along_axis(dist, ref, 1))


def check_topk_buckets(db, qs, bits, k):
    """The bucket kernel against the brute-force reference, over a snapshot-like view of db."""
    from latenthash import buckets as B

    class Snapshot:  # what buckets read of an index snapshot
        n, words, features = len(db), to_words(db, bits), None

    dw, qw = to_words(db, bits), to_words(qs, bits)
    dist = brute_distances(qw, dw)
    ref = np.argsort(dist, axis=1, kind="stable")[:, :k]
    b = B.build(Snapshot())
    ucodes = b.codes if b.codes is not None else dw  # too diverse to keep: check the kernel on singletons anyway
    offsets = b.offsets if b.codes is not None else np.arange(len(dw) + 1)
    rows = b.rows if b.codes is not None else np.arange(len(dw))
    for blocks in (1, 3):
        ids, d, counts = K.topk_buckets(np.ascontiguousarray(ucodes).ravel(), len(ucodes), dw.shape[1], offsets,
                                        rows, qw.ravel(), k, bits, blocks)
        kk = min(k, len(dw))
        assert (counts == kk).all()
        np.testing.assert_array_equal(ids[:, :kk], ref)
        np.testing.assert_array_equal(d[:, :kk], np.take_along_axis(dist, ref, 1))
        assert (ids[:, kk:] == -1).all()


@pytest.mark.parametrize("bits", [12, 48, 128, 200])
@pytest.mark.parametrize("k", [1, 37, 1000])
def test_topk_buckets_collapsed_codes(rng, bits, k):
    words = random_codes(rng, 40, bits)  # 40 codewords shared by 4000 rows, queries on and off them
    db = words[rng.integers(0, 40, 4000)]
    check_topk_buckets(db, np.concatenate([words[:3], random_codes(rng, 3, bits)]), bits, k)


def test_topk_buckets_real_and_k_beyond_n(rng, real_codes):
    db, q = real_codes
    check_topk_buckets(db, q[:8], 48, 100)
    check_topk_buckets(random_codes(rng, 30, 64), random_codes(rng, 2, 64), 64, 50)


@pytest.mark.parametrize("bits", [16, 48, 128])
def test_radius_search_and_counts(rng, real_codes, bits):
    db = random_codes(rng, 2000, bits) if bits != 48 else real_codes[0]
    qs = random_codes(rng, 5, bits) if bits != 48 else real_codes[1][:5]
    dw, qw = to_words(db, bits), to_words(qs, bits)
    dist = brute_distances(qw, dw)
    n, w = len(dw), dw.shape[1]
    hist = K.radius_counts(dw.ravel(), n, w, qw.ravel(), bits)
    for i in range(len(qs)):
        np.testing.assert_array_equal(hist[i], np.bincount(dist[i], minlength=bits + 1))
    radius = int(np.median(dist)) - 2
    limits = np.array([n, n, 3, 0, n], np.int64)
    offsets, found, ids, d = K.radius_search(dw.ravel(), n, w, qw.ravel(), radius, limits)
    for i in range(len(qs)):
        ref = np.argsort(dist[i], kind="stable")
        ref = ref[dist[i, ref] <= radius][: limits[i]]
        got = ids[offsets[i]:offsets[i] + found[i]]
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(d[offsets[i]:offsets[i] + found[i]], dist[i, ref])


@pytest.mark.parametrize("dim", [7, 24, 256])  # float16 is read 16 values at a time: a tail only, both, whole
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cosine_rerank(rng, dtype, dim):
    n, nq, pool = 500, 4, 60
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    qf = rng.standard_normal((nq, dim)).astype(np.float32)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    scales = None
    stored = feats.astype(dtype) if dtype != "int8" else None
    if dtype == "int8":
        scales = (np.abs(feats).max(1) / 127).astype(np.float32)
        stored = np.round(feats / scales[:, None]).astype(np.int8)
    rows = np.stack([rng.choice(n, pool, replace=False) for _ in range(nq)]).astype(np.int64)
    pool_n = np.array([pool, pool, 10, 0], np.int64)
    f, s = K.rerank_args(stored, scales)
    pos, scores = K.cosine_rerank(qf, f, s, rows, pool_n, 15)
    decoded = stored.astype(np.float32) * (scales[:, None] if scales is not None else 1)
    for i in range(nq):
        m = pool_n[i]
        ref_scores = decoded[rows[i, :m]] @ qf[i]
        ref = np.argsort(-ref_scores, kind="stable")[:15]
        np.testing.assert_array_equal(pos[i, :len(ref)], ref)
        np.testing.assert_allclose(scores[i, :len(ref)], ref_scores[ref], rtol=1e-5, atol=1e-6)
        assert (pos[i, len(ref):] == -1).all()
        # storage precision: scores close to the float32 truth
        np.testing.assert_allclose(scores[i, :len(ref)], feats[rows[i, ref]] @ qf[i],
                                   atol={"float32": 1e-6, "float16": 2e-3, "int8": 2e-2}[dtype])


@pytest.mark.parametrize("nq", [1, 3])  # one query splits its pool over the threads; a batch does not
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cosine_rerank_ties_and_large_pools(rng, nq, dtype):
    """Exact ties (duplicated features) across the k-th place, pools far above 4 k (the partition branch) and a
    single query's pool split over threads: hits must equal numpy's stable order, ties by pool position. Small
    integer features make every dot product exact, so numpy and the kernel agree bit for bit."""
    n, dim, pool, k = 3000, 16, 2000, 37
    base = rng.integers(-3, 4, (150, dim))
    feats = base[rng.integers(0, 150, n)]  # ~20 copies of each row: many exact ties
    qf = rng.integers(-3, 4, (nq, dim)).astype(np.float32)
    stored, scales = feats.astype(dtype), None
    if dtype == "int8":
        scales = np.ones(n, np.float32)
    rows = np.stack([rng.permutation(n)[:pool] for _ in range(nq)]).astype(np.int64)
    f, s = K.rerank_args(stored, scales)
    for kk in (k, pool):  # a cut through ties (partition branch), and the whole pool ranked (every score counts)
        pos, scores = K.cosine_rerank(qf, f, s, rows, np.full(nq, pool, np.int64), np.int64(kk))
        for i in range(nq):
            ref_scores = (feats[rows[i]] @ qf[i]).astype(np.float32)
            order = np.argsort(-ref_scores, kind="stable")
            if kk < pool:
                assert ref_scores[order[kk - 1]] == ref_scores[order[kk]]  # a tie at the cut
            np.testing.assert_array_equal(pos[i], order[:kk])
            np.testing.assert_array_equal(scores[i], ref_scores[order[:kk]])


def test_take_hits(rng):
    nq, width, k, n = 5, 40, 7, 300
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    pool = rng.integers(0, n, (nq, width)).astype(np.int64)
    pool_d = rng.integers(0, 49, (nq, width)).astype(np.int64)
    pos = np.full((nq, k), -1, np.int64)
    filled = [7, 3, 0, 7, 1]
    for i, m in enumerate(filled):
        pos[i, :m] = rng.choice(width, m, replace=False)
    got_i, got_d, counts = K.take_hits(pos, pool, pool_d, ids)
    np.testing.assert_array_equal(counts, filled)
    for i, m in enumerate(filled):
        np.testing.assert_array_equal(got_i[i, :m], ids[pool[i, pos[i, :m]]])
        np.testing.assert_array_equal(got_d[i, :m], pool_d[i, pos[i, :m]])
        assert (got_i[i, m:] == -1).all() and (got_d[i, m:] == -1).all()


@pytest.mark.parametrize("n", [6, 3 * K.GRAIN_CONVERT + 5])  # one row-piece on the calling thread, or several
def test_unit_rows(rng, n):
    x = rng.standard_normal((n, 33)).astype(np.float32) * np.float32(1e3)
    x[2] = 0
    x[4] *= np.float32(1e30)  # squares overflow float32: the norm is summed in float64
    unit, finite = K.unit_rows(x)
    assert finite and unit.dtype == np.float32
    ref = x.astype(np.float64) / np.maximum(np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(unit, ref, rtol=2e-6, atol=1e-7)
    assert not unit[2].any()
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[n - 1, 7] = bad  # in the last piece
        assert not K.unit_rows(y)[1]


def rotated(x, flips):
    """The sketch's structured rotation written out densely in float64 (numpy's reference for
    `kernels._sketch_block`): for each rotation, H F_k ... H F_1 of x zero-padded; (n, R * P)."""
    rotations, rounds, p = flips.shape
    h = np.ones((1, 1))
    while len(h) < p:
        h = np.block([[h, h], [h, -h]])
    y = np.zeros((len(x), p))
    y[:, :x.shape[1]] = x
    out = []
    for r in range(rotations):
        z = y
        for k in range(rounds):
            z = (z * flips[r, k]) @ h.T
        out.append(z)
    return np.concatenate(out, axis=1)


def sketch_bits(words):
    """Sketch words (n, S / 64) as their S bits in order (packbits layout, little-endian words)."""
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1).astype(bool)


@pytest.fixture(scope="module")
def cell_layout():
    """Collapsed 48-bit codes over 4,000 rows (30 codewords, a few bits flipped: big buckets and many small ones)
    with features, bucketed with small cells so that most buckets split."""
    from latenthash import buckets as B

    rng = np.random.default_rng(5)
    bits, dim = 48, 70
    centers = rng.random((30, bits)) < 0.5
    db = pack_codes(centers[rng.integers(0, 30, 4000)] ^ (rng.random((4000, bits)) < 0.002), bits)
    feats = rng.standard_normal((4000, dim)).astype(np.float32)
    feats[1::2] = feats[::2]  # duplicate features: ties in sign distance
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)

    class Snapshot:
        n, words, features, scales = len(db), to_words(db, bits), feats, None

    cell_rows = B.CELL_ROWS
    B.CELL_ROWS = 32
    try:
        b = B.build(Snapshot())
    finally:
        B.CELL_ROWS = cell_rows
    qs = pack_codes(centers[:3] ^ (rng.random((3, bits)) < 0.05), bits)
    qf = feats[:3] + 0.1 * rng.standard_normal((3, dim)).astype(np.float32)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    return b, db, feats, to_words(qs, bits), qf, bits


def test_cells_grow_as_the_square_root_of_their_bucket():
    """A bucket's cells hold CELL_SCALE sqrt(rows) rows each, at least MIN_CELL_ROWS (a smaller bucket is one cell)
    and at most CELL_ROWS: between the bounds, four times the rows make twice the cells."""
    from latenthash import buckets as B

    assert B.cells_for(1) == B.cells_for(B.MIN_CELL_ROWS) == 1
    for rows in (B.MIN_CELL_ROWS + 1, 1_000, 6_000, 30_000, 1_000_000):
        c = B.cells_for(rows)
        size = min(B.CELL_ROWS, max(B.MIN_CELL_ROWS, B.CELL_SCALE * rows ** 0.5))
        assert c == -(-rows // size) and rows / c <= B.CELL_ROWS
    low = int((B.MIN_CELL_ROWS / B.CELL_SCALE) ** 2) + 1  # the square-root regime: low..high rows
    high = int((B.CELL_ROWS / B.CELL_SCALE) ** 2)
    assert high >= 2 * low
    assert B.cells_for(high) == pytest.approx(B.cells_for(low) * (high / low) ** 0.5, abs=1)


@pytest.mark.parametrize("p", [64, 128, 256, 1024, 4096])
def test_one_vector_hadamard_against_numpy(rng, p):
    """The query's transform (`_hadamard_lanes`: in-vector shuffles, then whole vectors) is the Walsh-Hadamard
    matrix's product, in place, on a vector and on slices of a longer one."""
    from numba import njit

    @njit
    def transform(y, p):
        for r in range(y.shape[0] // p):
            K._hadamard_lanes(y[r * p:(r + 1) * p])

    h = np.ones((1, 1))
    while len(h) < p:
        h = np.block([[h, h], [h, -h]])
    x = rng.standard_normal(3 * p).astype(np.float32)
    y = x.copy()
    transform(y, p)
    want = (x.reshape(3, p).astype(np.float64) @ h.T).reshape(-1)
    np.testing.assert_allclose(y, want, atol=1e-5 * np.sqrt(p) * np.abs(x).max())


def test_cells_and_sketches_of_a_bucketed_layout(cell_layout):
    """Every bucket's rows, regrouped by cell: the same rows, big buckets split into about size / CELL_ROWS cells,
    each cell's centroid the unit mean of its rows; every row's sketch the sign bits of its rotated feature, less
    a centre taken from a strided sample of the features."""
    from latenthash import buckets as B

    b, db, feats, qw, qf, _ = cell_layout
    np.testing.assert_allclose(b.centre, feats[::B.CENTRE_STRIDE].mean(axis=0), atol=1e-6)
    # every row's sketch, stored 8 rows to a block in cell order: the signs of the rotated centred feature, as
    # numpy's dense product makes them, but where a coordinate lies within rounding of zero
    rows = b.signs.transpose(0, 2, 1).reshape(-1, b.signs.shape[1])[:len(db)]
    proj = rotated(feats[b.cell_rows] - b.centre, b.flips)[:, :B.SKETCH_BITS]
    clear = np.abs(proj) > 1e-4 * np.abs(proj).max()
    np.testing.assert_array_equal(sketch_bits(rows)[clear], (proj > 0)[clear])
    assert clear.mean() > 0.99
    # the query's side: its rotated centred feature in levels 0..L, zero at L / 2 and the largest magnitude at 0 or
    # L, as bit planes in the sketches' layout; its top plane is the query's own sketch (the sign bits)
    top = (1 << K.QUERY_LEVEL_BITS) - 1
    for x in qf:
        planes = K.query_levels(x, b.centre, b.flips, B.SKETCH_BITS)
        levels = (sketch_bits(planes) * (1 << np.arange(K.QUERY_LEVEL_BITS))[:, None]).sum(axis=0)
        assert levels.min() >= 0 and levels.max() <= top
        y = rotated((x - b.centre)[None], b.flips)[0, :B.SKETCH_BITS]
        want = y * (top / 2) / np.abs(y).max() + top / 2
        clear = np.abs(want - np.floor(want) - 0.5) > 1e-3  # not within rounding of a level's edge
        np.testing.assert_array_equal(levels[clear], np.floor(want[clear] + 0.5))
        assert clear.mean() > 0.99 and {levels.min(), levels.max()} & {0, top}
        own = K.sketch_rows(x[None], b.centre, b.flips, B.SKETCH_BITS)
        np.testing.assert_array_equal(sketch_bits(planes[-1:])[0][clear], sketch_bits(own)[0][clear])
    assert b.cells[-1] == len(db) and (np.diff(b.cells) > 0).all() and b.bucket_cells[-1] == len(b.cells) - 1
    split = 0
    for u in range(len(b.codes)):
        lo, hi = b.offsets[u], b.offsets[u + 1]
        np.testing.assert_array_equal(np.sort(b.cell_rows[lo:hi]), b.rows[lo:hi])  # the bucket's own rows
        g0, g1 = b.bucket_cells[u], b.bucket_cells[u + 1]
        assert b.cells[g0] == lo and b.cells[g1] == hi
        assert b.sizes[u] == (hi - lo) << 32 | (g1 - g0)  # rows and cells, for step 1's one histogram
        assert g1 - g0 <= -(-(hi - lo) // 32)  # cells_for with CELL_ROWS 32: at most 32 rows a cell
        split += g1 - g0 > 1
        for g in range(g0, g1):
            mean = feats[b.cell_rows[b.cells[g]:b.cells[g + 1]]].mean(axis=0)
            np.testing.assert_allclose(b.centroids[g].view(np.float16).astype(np.float32),
                                       mean / np.linalg.norm(mean), atol=2e-3)
    assert split >= 20  # most of the 30 big buckets split


def shells_reference(du, rows, cells, target, shell, max_cells, bits):
    """Step 1's buckets in numpy: the smallest distance covering `target` rows, widened towards `shell` rows while
    the cells stay within `max_cells`; the buckets within it, nearest first, ties by bucket."""
    cov = np.cumsum(np.bincount(du, weights=rows, minlength=bits + 1))
    cc = np.cumsum(np.bincount(du, weights=cells, minlength=bits + 1))
    cut = min(int(np.searchsorted(cov, target)), bits)
    while cut < bits and cov[cut] < shell and cc[cut + 1] <= max_cells:
        cut += 1
    return np.flatnonzero(du <= cut)[np.argsort(du[du <= cut], kind="stable")]


@pytest.mark.parametrize("spread", ["clustered", "uniform"])
@pytest.mark.parametrize("target", [1, 300, 20_000, 10**9])
@pytest.mark.parametrize("bits, nu", [(48, 3000), (48, K.SHELL_SCAN_CODES + 1), (128, K.SHELL_SCAN_CODES + 3),
                                      (1024, 402)])
def test_shell_picks_against_numpy(rng, spread, target, bits, nu):
    """The shells' buckets equal numpy's, whether d* lies at the nearest code's distance (clustered codes near the
    query) or many distances beyond it (uniform codes: past SHELL_LEVELS passes, the histogram finishes), counted
    by histogram (few codes) or distance by distance (more), for one-word, two-word and 1024-bit codes (distances
    past 255), and counts of codes that do not fill the last word of four distances."""
    centre = rng.random(bits) < 0.5
    flip = 0.03 if spread == "clustered" else 0.5
    codes = pack_codes(centre ^ (rng.random((nu, bits)) < flip), bits)
    rows, cells = rng.integers(1, 40, nu), rng.integers(1, 4, nu)
    sizes = (rows << 32 | cells).astype(np.int64)
    uw = to_words(codes, bits)
    for qbits in (centre, rng.random(bits) < 0.5):
        qw = to_words(pack_codes(qbits, bits), bits)
        for shell, max_cells in ((target, 10**9), (4 * target, max(1, target // 8))):
            picked, pdist, nrows = K._shell_picks(uw.reshape(-1), nu, uw.shape[1], sizes, qw[0], target, shell,
                                                  max_cells, bits)
            du = brute_distances(qw, uw)[0]
            want = shells_reference(du, rows, cells, target, shell, max_cells, bits)
            np.testing.assert_array_equal(picked, want)
            np.testing.assert_array_equal(pdist, du[want])
            assert nrows == rows[want].sum()


@pytest.mark.parametrize("target", [1, 50, 700, 5000])
@pytest.mark.parametrize("keep", [1, 7, 300])
def test_twostep_candidates_against_numpy(cell_layout, target, keep):
    """Step 1: whole distance shells, the smallest covering `target` rows widened towards SHELL_WIDEN x target
    while the cells stay within target / CELL_SHARE; cut to the cells nearest the query by centroid (whole
    similarity bins) until they cover `target`. Step 2's sketch pass keeps exactly the `keep` pool rows nearest by
    sketch, ties by pool order. The batch kernel and one query's fused path agree with these pieces composed."""
    from latenthash.buckets import SHELL_WIDEN

    b, db, feats, qw, qf, bits = cell_layout
    shell, max_cells = SHELL_WIDEN * target, max(1, target // K.CELL_SHARE)
    sizes, ncells = np.diff(b.offsets), np.diff(b.bucket_cells)
    pos, pos_d, counts = K.twostep_candidates(b.codes.reshape(-1), len(b.codes), 1, b.sizes, b.bucket_cells,
                                              b.cells, b.centroids, b.signs, qw.reshape(-1), qf, b.centre,
                                              b.flips, np.int64(shell), np.int64(target), bits, np.int64(keep))
    # each row's sketch bits in cell order (checked against numpy's rotation in the test above)
    sketch = sketch_bits(b.signs.transpose(0, 2, 1).reshape(-1, b.signs.shape[1])[:len(db)])
    centroids = b.centroids.view(np.float16).astype(np.float64)
    for i in range(3):
        # step 1, the shells, in integers: exact
        du = brute_distances(qw[i:i + 1], b.codes)[0]
        picked = shells_reference(du, sizes, ncells, target, shell, max_cells, bits)
        lo, hi, rd, covered = K._cell_ranges(qf[i], picked, du[picked], int(sizes[picked].sum()), b.bucket_cells,
                                             b.cells, b.centroids, np.int64(target))
        if sizes[picked].sum() <= target:  # nothing to cut: the shells' buckets whole
            np.testing.assert_array_equal(lo, b.offsets[picked])
            np.testing.assert_array_equal(hi, b.offsets[picked + 1])
            assert covered == sizes[picked].sum()
        else:  # the cut: cells of the shell, nearest by centroid first (within a bin of 2 / SIM_BINS), covering target
            mine = [g for u in picked for g in range(b.bucket_cells[u], b.bucket_cells[u + 1])]
            chosen = [g for g in mine if (b.cells[g], b.cells[g + 1]) in set(zip(lo.tolist(), hi.tolist()))]
            rows_in = b.cells[np.array(chosen) + 1] - b.cells[np.array(chosen)]
            assert covered == rows_in.sum() >= target and len(chosen) == len(lo)
            sim = centroids[mine] @ qf[i]
            inside = np.isin(mine, chosen)
            if not inside.all():
                assert sim[inside].min() >= sim[~inside].max() - 2 / K.SIM_BINS - 1e-5
            # no more than the cut's bin needs: without the farthest chosen cell the pool falls short, unless that
            # cell shares its bin with others
            assert covered - rows_in[np.argmin(centroids[chosen] @ qf[i])] < target or \
                (sim[inside] < sim[inside].min() + 2 / K.SIM_BINS).sum() > 1
        # step 2's sketch pass over that pool: exact
        pool = np.concatenate([b.cell_rows[x:y] for x, y in zip(lo, hi)])
        pool_at = np.concatenate([np.arange(x, y) for x, y in zip(lo, hi)])
        pool_d = np.concatenate([np.full(y - x, d) for x, y, d in zip(lo, hi, rd)])
        m = min(keep, len(pool))
        if len(pool) <= keep:  # everything fits: no sketch pass
            take = np.arange(len(pool))
        else:
            planes = K.query_levels(qf[i], b.centre, b.flips, sketch.shape[1])
            levels = (sketch_bits(planes) * (1 << np.arange(K.QUERY_LEVEL_BITS))[:, None]).sum(axis=0)
            sd = np.abs(((1 << K.QUERY_LEVEL_BITS) - 1) * sketch[pool_at] - levels).sum(axis=1)
            take = np.sort(np.argsort(sd, kind="stable")[:m])  # the m nearest by sketch distance, ties by pool order
        assert counts[i] == m
        np.testing.assert_array_equal(pos[i, :m], pool_at[take])
        np.testing.assert_array_equal(pos_d[i, :m], pool_d[take])
        np.testing.assert_array_equal(pos_d[i, :m], brute_distances(qw[i:i + 1], to_words(db, bits))[0][pool[take]])
        assert (pos[i, m:] == -1).all() and (pos_d[i, m:] == -1).all()
    # one query's fused path, given the code packed and the features as they come (scaled by two: normalizing
    # them gives exactly the unit rows of qf): both steps equal to the batch kernels composed on those rows
    qn = K.unit_rows(qf)[0]
    pos, pos_d, counts = K.twostep_candidates(b.codes.reshape(-1), len(b.codes), 1, b.sizes, b.bucket_cells,
                                              b.cells, b.centroids, b.signs, qw.reshape(-1), qn, b.centre,
                                              b.flips, np.int64(shell), np.int64(target), bits, np.int64(keep))
    rows = np.where(pos >= 0, b.cell_rows[np.maximum(pos, 0)], -1)
    f, s = K.rerank_args(feats.astype(np.float16), None)
    hits, scores = K.cosine_rerank(qn, f, s, rows, counts, np.int64(5))
    ids = np.arange(len(db), dtype=np.int64) * 10  # ids other than rows: the kernel must map them
    want_i, want_d, want_n = K.take_hits(hits, rows, pos_d, ids)
    layout = (b.codes.reshape(-1), len(b.codes), 1, b.sizes, b.bucket_cells, b.cells, b.centroids, b.signs,
              b.centre, b.flips, b.cell_rows, f, s, ids)
    packed = from_words(qw, bits)
    for i, parts in itertools.product(range(3), (1, 2, 7)):  # one query's passes on 1, 2 or 7 threads alike
        got_i, got_d, got_s, got_n = K.twostep_one(*layout, packed[i], 2 * qf[i], np.int64(shell), np.int64(target),
                                                   bits, np.int64(keep), np.int64(5), parts)
        np.testing.assert_array_equal(got_i[0], want_i[i])
        np.testing.assert_array_equal(got_d[0], want_d[i])
        np.testing.assert_array_equal(got_s[0], scores[i])
        assert got_n[0] == want_n[i]
    for bad in (np.nan, np.inf):  # features that cannot be normalized: nothing searched, counts -1
        q = qf[0].copy()
        q[3] = bad
        got_i, got_d, got_s, got_n = K.twostep_one(*layout, packed[0], q, np.int64(shell), np.int64(target), bits,
                                                   np.int64(keep), np.int64(5), 2)
        assert got_n[0] == -1 and (got_i == -1).all() and (got_d == -1).all() and np.isnan(got_s).all()


@pytest.mark.parametrize("n", [1, 2, 37, 256, 1000])
def test_sample_limit_bounds_the_kth_smallest(rng, n):
    """The sampled cut's limit is at or above the at-th smallest value at every rank, with ties, and above it by
    less than two SAMPLE_BINS-th parts of the values' range (one power-of-two bin)."""
    for values in (rng.integers(0, 50, n).astype(np.int32), rng.integers(0, 10**6, n).astype(np.int32),
                   np.full(n, 7, np.int32)):
        span = int(values.max()) - int(values.min())
        for at in sorted({0, 1 % n, n // 2, n - 1}):
            kth = np.partition(values, at)[at]
            limit = K._sample_limit(values, at)
            assert kth <= limit <= kth + 2 * (span // K.SAMPLE_BINS) + 1


@pytest.mark.parametrize("pattern", ["random", "ties", "sample_nearest"])
@pytest.mark.parametrize("m", [1, 40, 500])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_sketch_pick_keeps_exactly_the_nearest(rng, pattern, m, parts):
    """The sketch pass's cut, estimated from a sample of the distances, is exact: the m rows of the pool nearest by
    sketch distance, ties by pool order, also when the sample is unrepresentative (every sampled row nearer than all
    others, so the first estimate keeps too few and must widen) and when most rows tie."""
    n, words = 4000, 8
    top = (1 << K.QUERY_LEVEL_BITS) - 1
    # ranges not block-aligned, two shorter than a block, sharing blocks: the parallel pieces split inside ranges
    lo, hi = np.array([500, 1203, 1206, 1300, 3000]), np.array([1203, 1206, 1207, 2500, 3599])
    rdist = np.array([2, 3, 3, 4, 5])
    pool = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
    if pattern == "random":
        bits = rng.random((n, words * 64)) < 0.5
        levels = rng.integers(0, top + 1, words * 64)
    else:  # query levels all 0: a row's distance is L x its popcount
        levels = np.zeros(words * 64, np.int64)
        ones = rng.integers(1, 4, n) if pattern == "ties" else np.full(n, 6)
        if pattern == "sample_nearest":  # the rows the pass samples (every step-th of the pool) are the nearest
            ones[pool[::max(1, len(pool) // K.SAMPLE_ROWS)]] = 0
        bits = np.arange(words * 64)[None, :] < ones[:, None]
    signs = bits_to_blocks(bits)
    planes = np.packbits((levels[None, :] >> np.arange(K.QUERY_LEVEL_BITS)[:, None]) & 1, axis=1)
    planes = planes.view(np.uint64).reshape(K.QUERY_LEVEL_BITS, words)
    out_p, out_d = np.full(m, -1, np.int64), np.full(m, -1, np.int64)
    got = K._sketch_pick(planes, signs, lo, hi, rdist, np.int64(m), out_p, out_d, parts)
    dist = np.abs(top * bits[pool] - levels).sum(axis=1)
    take = np.sort(np.argsort(dist, kind="stable")[:m])
    assert got == m
    np.testing.assert_array_equal(out_p, pool[take])
    np.testing.assert_array_equal(out_d, np.repeat(rdist, hi - lo)[take])


def bits_to_blocks(bits):
    """Sign bits (n, S) as the bucket layout's sketches: packbits words, 8 rows to a block (buckets.block_sketches)."""
    from latenthash.buckets import block_sketches

    n = len(bits)
    words = np.packbits(bits, axis=1).view(np.uint64)
    padded = np.zeros((-(-n // 8) * 8, words.shape[1]), np.uint64)
    padded[:n] = words
    return block_sketches(padded)


@pytest.mark.parametrize("n", [300, 3 * K.GRAIN_CONVERT + 5])  # one row-piece on the calling thread, or several
def test_float16_conversions_match_numpy(rng, n):
    """float32 rows -> unit rows rounded to float16 (to nearest even, subnormals included) with their row scales,
    and float16 rows -> float32, bit for bit as numpy converts them; a row with NaN or infinity is reported."""
    x = (rng.standard_normal((n, 70)) * 0.06).astype(np.float32)
    x[0] = 0
    x[0, :11] = [1, 0, -0.0, 1e-8, -1e-8, 5.96e-8, 2.98e-8, 6.1e-5, 6.09e-5, 1 + 2**-11, 1 + 3 * 2**-11]
    x[1] = 0  # a zero row stays zero, its scale 1
    bits, scales, finite = K.unit_half_rows(x)
    want = K.unit_rows(x)[0].astype(np.float16)
    assert finite
    np.testing.assert_array_equal(bits, want.view(np.uint16))
    norms = np.linalg.norm(want.astype(np.float64), axis=1)
    np.testing.assert_allclose(scales, np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 1), rtol=1e-6)
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[n // 2, 3] = bad
        assert not K.unit_half_rows(y)[2]
    rows = rng.integers(0, n, n + 200)
    got = K.half_gather(want.view(np.uint16), rows)
    np.testing.assert_array_equal(got.view(np.uint32), want[rows].astype(np.float32).view(np.uint32))


def test_half_row_scales_match_numpy(rng):
    """1 / each float16 row's norm as numpy computes it in float64 (to float32 rounding); a zero row scales by 1."""
    x = (rng.standard_normal((200, 37)) * 0.1).astype(np.float16)
    x[5] = 0
    want = 1 / np.linalg.norm(x.astype(np.float64), axis=1)
    want[5] = 1
    np.testing.assert_allclose(K.half_row_scales(x.view(np.uint16)), want, rtol=1e-6)


def test_launch_cost_is_measured_per_thread():
    """Each thread measures what a parallel launch costs from it, once; one query's two-step splits over the
    threads only where that cost is below CHEAP_LAUNCH (on Numba's omp layer a thread other than the one that
    launched first pays far more per launch, and the workqueue layer more from any thread)."""
    import threading

    K.set_threads(2)
    here = K.launch_cost()
    assert 0 < here < 1 and K.launch_cost() == here  # measured once, then kept
    seen = {}

    def other():
        K.set_threads(2)
        seen["cost"], seen["parts"] = K.launch_cost(), K.one_query_parts()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert 0 < seen["cost"] < 1 and seen["cost"] != here  # its own measurement
    assert seen["parts"] == (2 if seen["cost"] <= K.CHEAP_LAUNCH and K.threads() > 1 else 1)
    assert K.one_query_parts() == (K.threads() if K.threads() > 1 and here <= K.CHEAP_LAUNCH else 1)
