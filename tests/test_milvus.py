"""The Milvus backend against the embedded one: the same adds, removes and queries give the same answers.

The congruence suite runs on milvus-lite (a real Milvus engine in a child process, a fresh file per test) and on a
real Milvus server with a BIN_IVF_FLAT index (nprobe = nlist: exact), started once per session from the `milvus`
package (or LATENTHASH_MILVUS_URI=milvus://host:19530). Hamming ties come back from Milvus in no set order, so top-k
results are compared as equal distance lists and equal id sets wherever no tie crosses the top-k boundary.
"""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest
from extras import need

need("pymilvus", "milvus")
need("milvus_lite", "milvus")

from helpers import assert_same_results  # noqa: E402

from latenthash import HashIndex, open_index  # noqa: E402
from latenthash.backend import parse_uri  # noqa: E402
from latenthash.errors import InvalidInput, ModelMismatch, NotFound, Unavailable  # noqa: E402
from latenthash.milvus import MilvusIndex  # noqa: E402

BITS, DIM, N = 64, 32, 3000


def lite_uri(tmp_path, collection="items", **query) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"milvus-lite://{tmp_path}/lite.db/{collection}" + (f"?{q}" if q else "")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    codes = np.packbits(rng.integers(0, 2, (N + 50, BITS), dtype=np.uint8), axis=1)
    feats = rng.normal(size=(N + 50, DIM)).astype(np.float32)
    meta = [{"label": str(i % 10), "n": i} if i % 3 else None for i in range(N)]
    queries = np.packbits(rng.integers(0, 2, (20, BITS), dtype=np.uint8), axis=1)
    qfeats = rng.normal(size=(20, DIM)).astype(np.float32)
    return codes, feats, meta, queries, qfeats


@pytest.fixture(params=["milvus-lite", "server-BIN_IVF_FLAT"])
def new_uri(request, tmp_path):
    """Makes URIs of fresh collections on milvus-lite, or on the real server (dropped at teardown)."""
    if request.param == "milvus-lite":
        yield lambda collection="items", **query: lite_uri(tmp_path, collection, **query)
        return
    server = request.getfixturevalue("milvus_server_uri")
    made = []

    def make(collection="items", **query):
        made.append(f"t{uuid.uuid4().hex[:12]}_{collection}")
        query = {"index": "BIN_IVF_FLAT", "nlist": 16, "nprobe": 16} | query
        return f"{server}/{made[-1]}?" + "&".join(f"{k}={v}" for k, v in query.items())

    yield make
    from pymilvus import MilvusClient

    client = MilvusClient(server.replace("milvus://", "http://"))
    for name in made:
        client.drop_collection(name)
    client.close()


@pytest.fixture
def pair(new_uri, data):
    """The same items in an embedded index and a Milvus index, after the same adds, replaces and removes."""
    codes, feats, meta, _, _ = data
    emb = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype="float32")
    mil = open_index(new_uri(), bits=BITS, feature_dim=DIM, create=True)
    ids = np.arange(N) * 3 + 11
    for ix in (emb, mil):
        assert ix.add(ids, codes[:N], feats[:N], meta) == 0
        assert ix.add(ids[:50], codes[N:], feats[N:], meta[50:100]) == 50  # re-add replaces
        assert ix.remove(np.r_[ids[100:130], [-5, 10**12]]) == 30  # unknown ids are ignored
    yield emb, mil, ids
    mil.close()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(2)


def test_uri_parsing():
    assert parse_uri("milvus://db.example:19531/images?nprobe=32") == {
        "client_uri": "http://db.example:19531", "collection": "images", "options": {"nprobe": "32"}, "lite": False}
    assert parse_uri("milvus+https://db/images")["client_uri"] == "https://db:19530"
    assert parse_uri("milvus-lite:///data/x.db/c")["client_uri"] == "/data/x.db"
    for bad in ("milvus://host", "milvus-lite:///data/x/c", "milvus:///images"):
        with pytest.raises(InvalidInput, match="must look like"):
            parse_uri(bad)


def test_exact_search_is_congruent(pair, data):
    emb, mil, ids = pair
    _, _, _, queries, _ = data
    assert len(emb) == len(mil) == N - 30
    for k in (1, 10, 100):
        e, m = emb.search(queries, k), mil.search(queries, k)
        assert_same_results(e, m, ties_in_any_order=True)
        stored = mil.get(m.ids[0, : m.counts[0]]).codes  # Milvus's distances are the true ones
        np.testing.assert_array_equal(hamming(queries[:1], stored)[0], m.distances[0, : m.counts[0]])
    one = mil.search(queries[0], 5)  # one query or a batch alike
    assert one.ids.shape == (1, 5)


def test_radius_search_is_congruent(pair, data):
    emb, mil, _ = pair
    _, _, _, queries, _ = data
    for r in (0, 22, 26):
        e, m = emb.search(queries, 1000, radius=r), mil.search(queries, 1000, radius=r)
        np.testing.assert_array_equal(e.counts, m.counts)
        for q in range(len(queries)):
            n = int(e.counts[q])
            assert set(e.ids[q, :n]) == set(m.ids[q, :n])
            np.testing.assert_array_equal(e.distances[q, :n], m.distances[q, :n])
            assert (m.distances[q, :n] <= r).all()
    assert m.counts.max() > 0


def test_two_step_search_is_congruent(pair, data):
    emb, mil, _ = pair
    _, _, _, queries, qfeats = data
    # the pool is whole distance shells on both (the codeword dictionary's shells on Milvus): the same answers at
    # every pool size, whatever order Milvus keeps ties in
    for kwargs in ({"pool": N}, {"radius": 28, "pool": N}, {"pool": 200}, {}, {"radius": 25}):
        e = emb.search(queries, 10, features=qfeats, **kwargs)
        m = mil.search(queries, 10, features=qfeats, **kwargs)
        np.testing.assert_array_equal(e.ids, m.ids)
        np.testing.assert_array_equal(e.distances, m.distances)
        np.testing.assert_allclose(e.scores, m.scores, atol=1e-5)
    assert mil.stats()["codewords"] == len(emb)  # random 64-bit codes: one codeword per item


def test_get_metadata_and_errors(pair, data):
    emb, mil, ids = pair
    codes, feats, meta, _, _ = data
    want = ids[[0, 49, 200, 2999]]
    a, b = emb.get(want), mil.get(want)
    np.testing.assert_array_equal(a.codes, codes[[N, N + 49, 200, 2999]])
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.features, b.features, atol=1e-6)
    assert a.metadata == b.metadata == [meta[50], meta[99], meta[200], meta[2999]]
    assert emb.metadata([ids[5], -1, 7]) == mil.metadata([ids[5], -1, 7])
    assert (ids[3] in mil) and (ids[110] not in mil)
    with pytest.raises(NotFound, match=str(ids[110])):
        mil.get([ids[1], ids[110]])
    with pytest.raises(InvalidInput, match="features must have shape"):
        mil.add([1], codes[:1], feats[:1, :5])
    with pytest.raises(InvalidInput, match="k must be an integer from 1 to 10000"):
        mil.search(codes[:1], 20000, features=feats[:1])
    with pytest.raises(InvalidInput, match="JSON"):
        mil.add([1], codes[:1], feats[:1], [object()])
    assert mil.stats()["count"] == N - 30 and mil.stats()["backend"] == "milvus"
    np.testing.assert_array_equal(mil.ids, np.sort(emb.ids))


def test_collections_are_checked(tmp_path, data):
    codes, feats, _, _, _ = data
    uri = lite_uri(tmp_path, "c1")
    with pytest.raises(NotFound, match="does not exist"):
        open_index(uri)
    ix = open_index(uri, bits=BITS, feature_dim=DIM, create=True)
    ix.add([1, 2], codes[:2], feats[:2])
    ix.save()
    ix.close()
    again = MilvusIndex(uri)  # bits and feature_dim come from the collection
    assert (again.bits, again.feature_dim, len(again)) == (BITS, DIM, 2)
    again.close()
    with pytest.raises(ModelMismatch, match="64-bit codes, not 48-bit"):
        open_index(uri, bits=48, create=True)
    with pytest.raises(InvalidInput, match="multiple of 8"):
        open_index(lite_uri(tmp_path, "c2"), bits=44, create=True)
    with pytest.raises(InvalidInput, match="only BIN_FLAT"):
        open_index(lite_uri(tmp_path, "c3", index="BIN_IVF_FLAT"), bits=BITS, create=True)


def test_a_milvus_that_is_down_is_a_clear_error_not_a_hang():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(Unavailable, match="cannot reach Milvus"):
        open_index(f"milvus://127.0.0.1:{port}/images?timeout=2", bits=BITS, create=True)
    assert time.perf_counter() - t0 < 15


def test_bin_ivf_flat_on_a_real_server(milvus_server_uri, data):
    """BIN_IVF_FLAT: exact with every list probed; fewer lists probed find fewer, never wrong, neighbours."""
    codes, feats, _, queries, _ = data
    name = f"ivf_{uuid.uuid4().hex[:12]}"
    # codes only: the code vector field is the collection's one vector field on Milvus 2.3
    ix = open_index(f"{milvus_server_uri}/{name}?index=BIN_IVF_FLAT&nlist=32", bits=BITS, create=True)
    try:
        ix.add(np.arange(N), codes[:N])
        exact = HashIndex(bits=BITS)
        exact.add(np.arange(N), codes[:N])
        ix.nprobe = 32  # all lists: exact
        assert_same_results(exact.search(queries, 10), ix.search(queries, 10), ties_in_any_order=True)
        ix.nprobe = 2
        few = ix.search(queries, 10)
        truth = hamming(queries, codes[:N])
        np.testing.assert_array_equal(few.distances, np.take_along_axis(truth, few.ids, 1))  # true distances
        assert (few.distances >= exact.search(queries, 10).distances).all()
        stats = ix.stats()
        assert stats["index_type"] == "BIN_IVF_FLAT" and stats["count"] == N and stats["feature_index"] is None
        again = MilvusIndex(f"{milvus_server_uri}/{name}")  # a reopened collection knows its layout
        assert (again.feature_dim, again.stats()["codewords"]) == (None, N)
        again.close()
    finally:
        ix._client.drop_collection(ix.collection)
        ix.close()


def test_an_edge_device_syncs_from_the_central_collection(milvus_server_uri, data, tmp_path):
    """docs/scale.md's edge sync: the device pulls items from the central collection by id into its embedded
    index, saves, reopens, and answers as the central collection does for those items."""
    codes, feats, meta, queries, qfeats = data
    central = open_index(f"{milvus_server_uri}/central_{uuid.uuid4().hex[:12]}", bits=BITS, feature_dim=DIM,
                         create=True)
    try:
        central.add(np.arange(N), codes[:N], feats[:N], meta)
        wanted = np.arange(0, N, 7)
        edge = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype="float32")
        for lo in range(0, len(wanted), 100):  # in pages, as a device on a thin link would
            items = central.get(wanted[lo:lo + 100])
            edge.add(items.ids, items.codes, items.features, items.metadata)
        edge.save(tmp_path / "edge")
        edge = HashIndex.open(tmp_path / "edge")
        assert len(edge) == len(wanted)
        got = edge.get(wanted[[0, 5, -1]])
        np.testing.assert_array_equal(got.codes, codes[wanted[[0, 5, -1]]])
        assert got.metadata == [meta[i] for i in wanted[[0, 5, -1]]]
        sub = open_index(f"{milvus_server_uri}/sub_{uuid.uuid4().hex[:12]}", bits=BITS, feature_dim=DIM,
                         create=True)  # the central side restricted to the synced ids, for the comparison
        try:
            items = central.get(wanted)
            sub.add(items.ids, items.codes, items.features, items.metadata)
            e = edge.search(queries, 10, features=qfeats, pool=len(wanted))
            m = sub.search(queries, 10, features=qfeats, pool=len(wanted))
            np.testing.assert_array_equal(e.ids, m.ids)
            np.testing.assert_allclose(e.scores, m.scores, atol=1e-5)
        finally:
            sub._client.drop_collection(sub.collection)
            sub.close()
    finally:
        central._client.drop_collection(central.collection)
        central.close()


def test_the_service_on_milvus_answers_like_the_embedded_searcher(tmp_path, onnx_model, small_fashion):
    """`latenthash serve --index milvus-lite://...`: the same upserts and queries through the client as embedded."""
    from latenthash.client import Client
    from latenthash.encoder import Encoder
    from latenthash.search import Searcher
    from latenthash.server.app import ServerConfig, create_server

    server, port = create_server(ServerConfig(index=lite_uri(tmp_path), model=str(onnx_model), port=0, create=True))
    enc = Encoder.open(onnx_model)
    embedded = Searcher(HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype="float32"), enc)
    images, labels = small_fashion.train.images[:400], small_fashion.train.labels[:400]
    meta = [{"label": int(c)} for c in labels]
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        try:
            assert client.upsert(np.arange(400), images=list(images), metadata=meta) == (400, 0)
            embedded.upsert(np.arange(400), images=images, metadata=meta)
            assert client.upsert([3], images=list(small_fashion.test.images[50:51])) == (1, 1)
            embedded.upsert([3], images=small_fashion.test.images[50:51])
            assert client.delete([7, 8, 10**9]) == embedded.delete([7, 8, 10**9]) == (2, 1)
            queries = small_fashion.test.images[:10]
            e, r = embedded.search(images=queries, k=10), client.search(images=queries, k=10)  # pool >= all items
            np.testing.assert_array_equal(e.ids, r.ids)
            np.testing.assert_allclose(e.scores, r.scores, atol=1e-5)
            assert e.metadata == r.metadata
            e, r = embedded.search(images=queries, k=20, rerank=False), client.search(images=queries, k=20,
                                                                                          rerank=False)
            assert_same_results(e, r, ties_in_any_order=True)  # 24-bit codes of a trained model: many ties
            assert client.stats().count == len(embedded.index) == 398
            with pytest.raises(NotFound):
                client.get([7])
        finally:
            server.stop(1)


def test_the_codeword_dictionary_follows_writes_and_restarts(new_uri, data):
    """Deleting every row of a codeword takes it out of the searches; replacing moves a row's count; a new client
    rebuilds the same dictionary from the collection."""
    from collections import Counter

    from latenthash.codebook import keys_of

    codes, feats, _, queries, qfeats = data
    shared = np.repeat(codes[:1], 40, axis=0)  # 40 rows of one codeword, the rest random
    stored = np.concatenate([shared, codes[1:300]])
    ids = np.arange(len(stored))
    mil = open_index(new_uri("dict"), bits=BITS, feature_dim=DIM, create=True)
    try:
        mil.add(ids, stored, feats[:len(stored)])
        key = keys_of(codes[:1], BITS)[0]
        assert mil.codebook.counts()[key] == 40
        assert mil.codebook.shells(codes[0], 1).keys == [key]  # its own shell covers a pool of one
        hit = mil.search(codes[:1], 10, features=feats[:1], pool=1)
        assert set(hit.ids[0]) <= set(range(40)) and (hit.distances == 0).all()
        mil.add([299], codes[:1], feats[:1])  # a replace moves the row's count to the shared codeword
        assert mil.codebook.counts()[key] == 41
        assert mil.remove(np.r_[np.arange(40), [299]]) == 41
        assert key not in mil.codebook.counts()
        shells = mil.codebook.shells(codes[0], 1)
        assert key not in shells.keys and shells.cut > 0  # the search goes on to the next nearest codewords
        after = mil.search(codes[:1], 10, features=feats[:1], pool=1)
        n = int(after.counts[0])
        assert n >= 1 and not set(after.ids[0, :n].tolist()) & set(range(40))
        assert (after.distances[0, :n] == shells.cut).all()
        exact = mil.search(codes[:1], 5)
        assert (exact.distances > 0).all()
        truth = Counter(keys_of(mil.get(mil.ids).codes, BITS))
        assert mil.codebook.counts() == truth
        again = MilvusIndex(mil.uri)  # a restarted client reads it back
        assert again.codebook.counts() == truth
        np.testing.assert_array_equal(again.search(queries, 10, features=qfeats).ids,
                                      mil.search(queries, 10, features=qfeats).ids)
        again.close()
    finally:
        mil.close()


def test_a_collection_of_the_old_layout_is_refused_with_the_way_to_upgrade(tmp_path, data):
    from pymilvus import DataType, MilvusClient

    from latenthash.errors import FailedPrecondition
    from latenthash.milvus import upgrade

    codes, feats, meta, queries, qfeats = data
    client = MilvusClient(f"{tmp_path}/lite.db")  # layout 1, as an earlier latenthash wrote it
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=BITS)
    schema.add_field("feature", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("metadata", DataType.JSON)
    params = client.prepare_index_params()
    params.add_index("code", index_type="BIN_FLAT", metric_type="HAMMING")
    params.add_index("feature", index_type="FLAT", metric_type="IP")
    client.create_collection("old", schema=schema, index_params=params)
    unit = feats[:500] / np.linalg.norm(feats[:500], axis=1, keepdims=True)
    client.insert("old", [{"id": i, "code": codes[i].tobytes(), "feature": unit[i].tolist(),
                           "metadata": {"v": meta[i]}} for i in range(500)])
    client.close()
    old = lite_uri(tmp_path, "old")
    with pytest.raises(FailedPrecondition, match=r"layout 1 .* `python -m latenthash.milvus upgrade"):
        open_index(old)
    assert upgrade(old, lite_uri(tmp_path, "new")) == 500
    new = open_index(lite_uri(tmp_path, "new"))
    items = new.get(np.arange(500))
    np.testing.assert_array_equal(items.codes, codes[:500])
    np.testing.assert_allclose(items.features, unit, atol=1e-6)
    assert items.metadata == meta[:500]
    emb = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype="float32")
    emb.add(np.arange(500), codes[:500], feats[:500])
    np.testing.assert_array_equal(new.search(queries, 10, features=qfeats).ids,
                                  emb.search(queries, 10, features=qfeats).ids)
    new.close()


def test_two_step_on_real_features_agrees_with_the_embedded_index(milvus_server_uri, onnx_model, fashion):
    """Fashion-MNIST's 60k training images encoded by a trained model, in Milvus (the codeword dictionary's shells,
    then Milvus's filtered feature search) and in the embedded index (float32 features, and its default float16
    with sketches laid out by code): the top-10 of 300 test queries agree on >= 95% of positions, a position
    agreeing on the same id or on a tied score (float32: equal; float16: within its rounding)."""
    from latenthash.encoder import Encoder

    enc = Encoder.open(onnx_model)
    db = enc.encode(fashion.train.images)
    q = enc.encode(fashion.test.images[:300])
    ids = np.arange(len(db.codes))
    mil = open_index(f"{milvus_server_uri}/real_{uuid.uuid4().hex[:12]}", bits=enc.bits,
                     feature_dim=enc.feature_dim, create=True)
    try:
        for lo in range(0, len(ids), 10_000):
            mil.add(ids[lo:lo + 10_000], db.codes[lo:lo + 10_000], db.features[lo:lo + 10_000])
        assert mil.stats()["codewords"] == len(np.unique(db.codes, axis=0))
        m = mil.search(q.codes, 10, features=q.features)
        for dtype, tie in (("float32", 1e-5), ("float16", 2e-3)):
            emb = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype=dtype)
            emb.add(ids, db.codes, db.features)
            e = emb.search(q.codes, 10, features=q.features)
            agree = (e.ids == m.ids) | (np.abs(e.scores - m.scores) <= tie)
            print(f"{dtype}: top-10 positions agreeing {agree.mean():.4f} (same id {(e.ids == m.ids).mean():.4f}, "
                  f"same set {np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(e.ids, m.ids)]):.4f})")
            assert agree.mean() >= 0.95
        np.testing.assert_array_equal(e.distances[:, 0] >= 0, m.distances[:, 0] >= 0)
    finally:
        mil._client.drop_collection(mil.collection)
        mil.close()


def test_long_codes_are_text_codewords(new_uri, rng):
    """Codes longer than 64 bits are stored as hex codewords: the same answers as the embedded index."""
    bits, n = 128, 800
    codes = np.packbits(rng.integers(0, 2, (n, bits), dtype=np.uint8), axis=1)
    codes[100:200] = codes[0]  # a shared codeword
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    queries, qfeats = codes[[0, 5, 300]] ^ np.uint8(3), rng.normal(size=(3, DIM)).astype(np.float32)
    emb = HashIndex(bits=bits, feature_dim=DIM, feature_dtype="float32")
    mil = open_index(new_uri("long"), bits=bits, feature_dim=DIM, create=True)
    try:
        for ix in (emb, mil):
            ix.add(np.arange(n), codes, feats)
        np.testing.assert_array_equal(mil.get([0, 150, 799]).codes, codes[[0, 150, 799]])
        for pool in (50, 300, None):
            e, m = emb.search(queries, 10, features=qfeats, pool=pool), mil.search(queries, 10, features=qfeats,
                                                                                    pool=pool)
            np.testing.assert_array_equal(e.ids, m.ids)
            np.testing.assert_allclose(e.scores, m.scores, atol=1e-5)
        assert_same_results(emb.search(queries, 20), mil.search(queries, 20), ties_in_any_order=True)
        assert mil.stats()["codewords"] == n - 100
    finally:
        mil.close()
