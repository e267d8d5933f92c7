"""End-to-end: the real server on a loopback port with a small real model and index, called through the client,
compared with the embedded Searcher (congruence), plus bad input for each RPC, auth, TLS and durability."""

import asyncio
import datetime
import io
import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from helpers import assert_same_results
from PIL import Image

from latenthash import HashIndex
from latenthash.client import AsyncClient, Client
from latenthash.encoder import Encoder
from latenthash.errors import InvalidInput, NotFound, Unauthenticated, Unavailable
from latenthash.ingest import add_images
from latenthash.search import Searcher
from latenthash.server.app import ServerConfig, create_server
from latenthash.server.wal import FILE_MAGIC
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

N_DB = 1000


@pytest.fixture(scope="module")
def index_dir(onnx_model, small_fashion, tmp_path_factory):
    enc = Encoder.open(onnx_model)
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype="float32")
    labels = small_fashion.train.labels[:N_DB]
    add_images(index, enc, small_fashion.train.images[:N_DB], ids=np.arange(N_DB),
               metadata=[{"label": int(c)} for c in labels], progress=False)
    path = tmp_path_factory.mktemp("index") / "ix"
    index.save(path)
    return path


@pytest.fixture
def served(index_dir, onnx_model, tmp_path):
    """A fresh copy of the index served on port 0, and an embedded Searcher over another copy."""
    import shutil

    remote_dir, local_dir = tmp_path / "remote", tmp_path / "local"
    shutil.copytree(index_dir, remote_dir)
    shutil.copytree(index_dir, local_dir)
    server, port = create_server(ServerConfig(index=str(remote_dir), model=str(onnx_model), port=0))
    client = Client(f"127.0.0.1:{port}", timeout=20)
    embedded = Searcher(HashIndex.open(local_dir), Encoder.open(onnx_model))
    yield server, client, embedded, remote_dir
    client.close()
    server.stop(1)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, "PNG")
    return buf.getvalue()


def test_congruence_embedded_and_remote(served, small_fashion):
    server, client, embedded, _ = served
    queries = small_fashion.test.images[:12]
    for kwargs in ({"k": 10}, {"k": 5, "rerank": False}, {"k": 20, "pool": 50}, {"k": 50, "radius": 3},
                   {"k": 10, "label": "7"}):
        assert_same_results(embedded.search(images=queries, **kwargs), client.search(images=queries, **kwargs))
    one = client.search(images=[png(queries[0])], k=10)  # encoded bytes: same pixels, same hits
    assert_same_results(embedded.search(images=queries[:1], k=10), one)
    enc = embedded.encode(queries[:4])
    for kwargs in ({"k": 10}, {"k": 10, "features": enc.features}):
        assert_same_results(embedded.search(codes=enc.codes, **kwargs), client.search(codes=enc.codes, **kwargs))
    remote_enc = client.encode(list(queries[:4]))
    np.testing.assert_array_equal(remote_enc.codes, enc.codes)
    np.testing.assert_allclose(remote_enc.features, enc.features, atol=1e-6)
    # and the answers are good: most of the top 10 share the query's class
    res = client.search(images=queries, k=10)
    labels = small_fashion.train.labels[res.ids]
    assert (labels == small_fashion.test.labels[:12, None]).mean() > 0.6


def test_writes_are_congruent_too(served, small_fashion):
    server, client, embedded, _ = served
    new = small_fashion.test.images[20:30]
    ids = np.arange(5000, 5010)
    meta = [{"label": "new", "n": i} for i in range(10)]
    assert client.upsert(ids, images=list(new), metadata=meta) == embedded.upsert(ids, images=new, metadata=meta)
    assert client.upsert(ids[:2], images=list(new[:2])) == (2, 2)
    embedded.upsert(ids[:2], images=new[:2])
    assert client.delete([5005, 5006, 99999]) == embedded.delete([5005, 5006, 99999]) == (2, 1)
    got, ref = client.get([5000, 5009, 3]), embedded.get([5000, 5009, 3])
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_allclose(got.features, ref.features, atol=1e-6)
    assert got.metadata == ref.metadata and got.metadata[1] == {"label": "new", "n": 9}
    assert_same_results(embedded.search(images=new, k=15), client.search(images=new, k=15))
    stats = client.stats()
    assert stats.count == N_DB + 8 and stats.bits == 24 and stats.model["bits"] == 24


def test_async_client(served, small_fashion):
    server, client, embedded, _ = served
    port = client.channel._channel.target().decode().rsplit(":", 1)[1]

    enc = embedded.encode(small_fashion.test.images[:6])

    async def run():
        async with AsyncClient(f"127.0.0.1:{port}") as ac:
            res = await ac.search(images=small_fashion.test.images[:3], k=5)
            by_codes = await ac.search(codes=enc.codes, features=enc.features, k=4)  # SearchCodes
            stats = await ac.stats()
            with pytest.raises(NotFound):
                await ac.get([123456789])
            encoded = await ac.encode(small_fashion.test.images[:6])
            written = await ac.upsert([777001, 777002], codes=enc.codes[:2], features=enc.features[:2],
                                      metadata=[{"a": 1}, None])
            got = await ac.get([777001, 777002])
            deleted = await ac.delete([777001, 777002, 123456789])
            after = await ac.stats()
        return res, by_codes, stats, encoded, written, got, deleted, after

    res, by_codes, stats, encoded, written, got, deleted, after = asyncio.run(run())
    assert_same_results(embedded.search(images=small_fashion.test.images[:3], k=5), res)
    assert_same_results(embedded.search(codes=enc.codes, features=enc.features, k=4), by_codes)
    assert stats.count == N_DB == after.count
    np.testing.assert_array_equal(encoded.codes, enc.codes)
    np.testing.assert_allclose(encoded.features, enc.features, atol=1e-6)
    assert written == (2, 0) and deleted == (2, 1)
    np.testing.assert_array_equal(got.codes, enc.codes[:2])
    assert got.metadata == [{"a": 1}, None]


def test_a_server_without_a_model_serves_codes_and_refuses_images_clearly(index_dir, tmp_path, small_fashion,
                                                                          onnx_model):
    import shutil

    shutil.copytree(index_dir, tmp_path / "ix")
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), port=0))
    enc = Encoder.open(onnx_model).encode(small_fashion.test.images[:2])
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.search(codes=enc.codes, features=enc.features, k=3).counts.tolist() == [3, 3]
            for call in (lambda: client.search(images=small_fashion.test.images[:1], k=3),
                         lambda: client.upsert([5], images=small_fashion.test.images[:1]),
                         lambda: client.encode(small_fashion.test.images[:1])):
                with pytest.raises(InvalidInput, match="model"):
                    call()
            assert client.stats().count == N_DB  # nothing was written
    finally:
        server.stop(1)


def test_on_serving_comes_before_the_kernels_are_compiled(index_dir, tmp_path, small_fashion, onnx_model, caplog):
    """create_server serves before it compiles its kernels: `on_serving` (what `latenthash serve` prints its address
    from) is called before the "warm" event, and a search made from it is answered."""
    import logging
    import shutil

    shutil.copytree(index_dir, tmp_path / "ix")
    enc = Encoder.open(onnx_model).encode(small_fashion.test.images[:2])
    seen = []

    def events():
        return [json.loads(r.getMessage())["event"] for r in caplog.records if r.name.startswith("latenthash")]

    def serving(server, port):
        seen.append(events())
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            seen.append(client.search(codes=enc.codes, features=enc.features, k=3).counts.tolist())

    with caplog.at_level(logging.INFO):
        server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), port=0), on_serving=serving)
    try:
        assert "started" in seen[0] and "warm" not in seen[0] and seen[1] == [3, 3]
        assert events()[-1] == "warm"  # compiled once create_server returned
    finally:
        server.stop(1)


def stub_call(client, method, request):
    return getattr(pb_grpc.HashSearchStub(client.channel), method)(request, timeout=10)


@pytest.mark.parametrize("method, request_, match", [
    ("Search", pb.SearchRequest(k=5), "empty request"),
    ("Search", pb.SearchRequest(query=pb.Query(code=b"\x00\x01"), k=5), "code has 2 bytes"),
    ("Search", pb.SearchRequest(query=pb.Query(code=b"\x00\x01\x02"), k=0), "k must be"),
    ("Search", pb.SearchRequest(query=pb.Query(code=b"\x00\x01\x02"), k=10**6), "k must be"),
    ("Search", pb.SearchRequest(query=pb.Query(image=b"not an image"), k=5), "cannot decode"),
    ("Search", pb.SearchRequest(query=pb.Query(tensor=pb.ImageTensor(data=b"12", height=28, width=28, channels=1)),
                                k=5), "tensor data holds 2 bytes"),
    ("Search", pb.SearchRequest(query=pb.Query(code=b"\x00\x01\x02", feature=[1.0, 2.0]), k=5), "shape"),
    ("Search", pb.SearchRequest(query=pb.Query(code=b"\x00\x01\x02"), k=5, radius=99), "radius"),
    ("SearchBatch", pb.SearchBatchRequest(), "empty batch"),
    ("SearchCodes", pb.SearchCodesRequest(k=5), "codes holds 0 bytes"),
    ("SearchCodes", pb.SearchCodesRequest(codes=bytes(7), k=5), "codes holds 7 bytes"),
    ("SearchCodes", pb.SearchCodesRequest(codes=bytes(6), k=0), "k must be"),
    ("SearchCodes", pb.SearchCodesRequest(codes=bytes(6), features=bytes(8), k=5), "features holds 8 bytes"),
    ("SearchCodes", pb.SearchCodesRequest(codes=bytes(3 * 10_001), k=5), "at most 10000 codes"),
    ("SearchCodes", pb.SearchCodesRequest(codes=bytes(6), k=5, radius=99), "radius"),
    ("Delete", pb.DeleteRequest(), "empty Delete"),
    ("Get", pb.GetRequest(), "empty Get"),
    ("Encode", pb.EncodeRequest(), "empty Encode"),
    ("Encode", pb.EncodeRequest(images=[b"garbage"]), "image 0"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(served, method, request_, match):
    server, client, *_ = served
    with pytest.raises(grpc.RpcError) as info:
        stub_call(client, method, request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()
    assert client.stats().count == N_DB  # still serving


def test_bad_upserts_and_unknown_ids(served):
    server, client, *_ = served
    stub = pb_grpc.HashSearchStub(client.channel)
    for items, match in [
        ([], "empty Upsert"),
        ([pb.UpsertItem(id=1)], "set image, tensor or code"),
        ([pb.UpsertItem(id=1, code=b"\x00\x00\x00", feature=[0.0] * 3)], "64-d features"),
        ([pb.UpsertItem(id=1, image=b"junk")], "cannot decode"),
        ([pb.UpsertItem(id=1, code=b"\x00" * 3, feature=[1.0] * 64, metadata_json="{bad")], "not valid JSON"),
        ([pb.UpsertItem(id=1, code=b"\x00" * 3, feature=[1.0] * 64)] * 2, "do not repeat an id"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Upsert(iter(items), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in info.value.details()
    with pytest.raises(NotFound, match="123456"):
        client.get([123456])
    with pytest.raises(InvalidInput):
        client.search(codes=np.zeros((1, 24), bool), k=0)
    assert client.stats().count == N_DB  # nothing half-applied


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, client, *_ = served
    health = health_pb2_grpc.HealthStub(client.channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service="latenthash.v1.HashSearch"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=5))
    names = [s.name for s in answers[0].list_services_response.service]
    assert "latenthash.v1.HashSearch" in names


def mixed_requests(embedded, images) -> tuple[list, list]:
    """Search requests of every kind (code, code + feature, tensor, with a label) and the embedded answer to each."""
    enc = embedded.encode(images)
    reqs, refs = [], []
    for i, im in enumerate(images):
        kind = i % 4
        if kind == 0:
            reqs.append(pb.SearchRequest(query=pb.Query(code=enc.codes[i].tobytes()), k=5))
            refs.append(embedded.search(codes=enc.codes[i:i + 1], k=5))
        elif kind == 1:
            reqs.append(pb.SearchRequest(query=pb.Query(code=enc.codes[i].tobytes(), feature=enc.features[i]), k=7,
                                         pool=40))
            refs.append(embedded.search(codes=enc.codes[i:i + 1], features=enc.features[i:i + 1], k=7, pool=40))
        elif kind == 2:
            reqs.append(pb.SearchRequest(query=pb.Query(tensor=pb.ImageTensor(
                data=im.tobytes(), height=im.shape[0], width=im.shape[1], channels=im.shape[2])), k=5))
            refs.append(embedded.search(images=im[None], k=5))
        else:
            reqs.append(pb.SearchRequest(query=pb.Query(code=enc.codes[i].tobytes()), k=4, label="3"))
            refs.append(embedded.search(codes=enc.codes[i:i + 1], k=4, label="3"))
    return reqs, refs


def assert_response(resp, ref):
    assert [h.id for h in resp.hits] == ref.ids[0, :ref.counts[0]].tolist()
    assert [h.distance for h in resp.hits] == ref.distances[0, :ref.counts[0]].tolist()
    if ref.scores is not None:
        np.testing.assert_allclose([h.score for h in resp.hits], ref.scores[0, :ref.counts[0]], atol=1e-6)
    assert [json.loads(h.metadata_json) if h.metadata_json else None for h in resp.hits] == ref.metadata[0]


def test_streaming_search_is_pipelined_and_in_order(served, small_fashion):
    server, client, embedded, _ = served
    stub = pb_grpc.HashSearchStub(client.channel)
    reqs, refs = mixed_requests(embedded, small_fashion.test.images[:200])
    before = server.service.search_batcher.batches
    out = list(stub.SearchStream(iter(reqs), timeout=30))
    assert len(out) == len(reqs)
    for resp, ref in zip(out, refs):
        assert_response(resp, ref)
    assert server.service.search_batcher.batches - before < len(reqs) // 2  # queued queries shared searches


def test_stream_and_batch_answer_up_to_a_bad_request(served, small_fashion):
    server, client, embedded, _ = served
    stub = pb_grpc.HashSearchStub(client.channel)
    reqs, refs = mixed_requests(embedded, small_fashion.test.images[:12])
    bad = pb.SearchRequest(query=pb.Query(code=b"\x00"), k=5)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in stub.SearchStream(iter(reqs[:6] + [bad] + reqs[6:]), timeout=30):
            received.append(resp)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "code has 1 bytes" in info.value.details()
    assert len(received) == 6
    for resp, ref in zip(received, refs):
        assert_response(resp, ref)
    with pytest.raises(grpc.RpcError) as info:
        stub.SearchBatch(pb.SearchBatchRequest(requests=reqs[:3] + [bad]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request 3: code has 1 bytes" in \
        info.value.details()
    for resp, ref in zip(stub.SearchBatch(pb.SearchBatchRequest(requests=reqs), timeout=30).responses, refs):
        assert_response(resp, ref)


def test_many_queries_travel_in_chunks(served, small_fashion):
    from latenthash import wire

    server, client, embedded, _ = served
    enc = embedded.encode(small_fashion.test.images[:250])
    codes = np.concatenate([enc.codes] * 10)  # 2500 queries: three SearchCodes calls
    assert len(codes) > 2 * wire.SEARCH_CHUNK
    assert_same_results(embedded.search(codes=codes, k=5), client.search(codes=codes, k=5))
    images = np.concatenate([small_fashion.test.images[:250]] * 5)  # three SearchBatch calls
    assert_same_results(embedded.search(images=images, k=3), client.search(images=images, k=3))


def test_columnar_code_search_is_congruent(served, small_fashion):
    """SearchCodes (what the client uses for several codes) returns what the embedded searcher returns, with every
    option; its flat arrays split by `counts` give each query's hits."""
    server, client, embedded, _ = served
    enc = embedded.encode(small_fashion.test.images[:40])
    for kwargs in ({"k": 7}, {"k": 7, "features": enc.features}, {"k": 30, "radius": 2}, {"k": 5, "pool": 20,
                   "features": enc.features, "label": "3"}, {"k": 4, "rerank": False, "features": enc.features},
                   {"k": 6, "metadata": False}):
        ref, got = embedded.search(codes=enc.codes, **kwargs), client.search(codes=enc.codes, **kwargs)
        assert_same_results(ref, got)
    assert got.metadata is None
    resp = stub_call(client, "SearchCodes", pb.SearchCodesRequest(codes=enc.codes[:3].tobytes(), k=4,
                                                                  features=enc.features[:3].astype("<f4").tobytes()))
    ref = embedded.search(codes=enc.codes[:3], features=enc.features[:3], k=4)
    assert list(resp.counts) == [4, 4, 4] and resp.reranked and len(resp.metadata_json) == 12
    assert list(resp.ids) == ref.ids.ravel().tolist()
    assert [json.loads(t) for t in resp.metadata_json] == [m for row in ref.metadata for m in row]
    nan = np.full_like(enc.features[:2], np.nan).astype("<f4").tobytes()
    with pytest.raises(grpc.RpcError) as info:
        stub_call(client, "SearchCodes", pb.SearchCodesRequest(codes=enc.codes[:2].tobytes(), features=nan, k=4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in info.value.details()


def test_dynamic_batching_merges_concurrent_image_queries(served, small_fashion):
    from concurrent.futures import ThreadPoolExecutor

    server, client, *_ = served
    batcher = server.service.batcher
    before_batches, before_items = batcher.batches, batcher.items
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: client.search(images=small_fashion.test.images[i:i + 1], k=3), range(64)))
    calls = batcher.batches - before_batches
    assert batcher.items - before_items == 64
    assert 64 / batcher.max_batch <= calls < 64  # some calls shared an encoder run, no run exceeded its limit
    embedded = server.searcher  # the same index and model, called directly (no batching)
    for i, remote in enumerate(got):  # each caller got the answer to its own image, not a neighbour's
        assert_same_results(embedded.search(images=small_fashion.test.images[i:i + 1], k=3), remote)


def test_concurrent_queries_share_one_search_and_keep_their_own_errors(served, small_fashion):
    from concurrent.futures import ThreadPoolExecutor

    server, client, embedded, _ = served
    enc = embedded.encode(small_fashion.test.images[:64])
    batcher = server.service.search_batcher
    before = batcher.batches

    def one(i):
        if i % 8 == 7:  # a bad neighbour: features of the wrong length
            with pytest.raises(InvalidInput, match="features"):
                client.search(codes=enc.codes[i:i + 1], features=enc.features[i:i + 1, :3], k=5)
            return None
        return client.search(codes=enc.codes[i:i + 1], features=enc.features[i:i + 1] if i % 2 else None, k=5)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(64)))
    assert batcher.batches - before < 64  # some queries shared a search
    for i, remote in enumerate(got):
        if remote is not None:
            alone = embedded.search(codes=enc.codes[i:i + 1], features=enc.features[i:i + 1] if i % 2 else None, k=5)
            assert_same_results(alone, remote)


def test_auth(index_dir, onnx_model, tmp_path):
    import shutil

    shutil.copytree(index_dir, tmp_path / "ix")
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), model=str(onnx_model), port=0,
                                              token="s3cret"))
    try:
        with pytest.raises(Unauthenticated, match="bearer token"):
            Client(f"127.0.0.1:{port}").stats()
        with pytest.raises(Unauthenticated):
            Client(f"127.0.0.1:{port}", token="wrong").search(codes=np.zeros((1, 24), bool), k=1)
        with pytest.raises(Unauthenticated):
            Client(f"127.0.0.1:{port}", token="wrong").upsert([1], codes=np.zeros((1, 24), bool),
                                                               features=np.ones((1, 64)))
        assert Client(f"127.0.0.1:{port}", token="s3cret").stats().count == N_DB
    finally:
        server.stop(1)


def make_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls(index_dir, onnx_model, tmp_path):
    import shutil

    shutil.copytree(index_dir, tmp_path / "ix")
    cert, key = make_cert(tmp_path)
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), model=str(onnx_model), port=0,
                                              host="localhost", tls_cert=str(cert), tls_key=str(key), token="t"))
    try:
        with Client(f"localhost:{port}", tls=cert, token="t") as c:
            assert c.stats().count == N_DB
        with pytest.raises(Unavailable):  # plaintext against a TLS port
            Client(f"localhost:{port}", token="t", timeout=2, retries=0).stats()
    finally:
        server.stop(1)


def test_acknowledged_upserts_survive_a_crash(index_dir, onnx_model, tmp_path, small_fashion):
    """A server process is killed with SIGKILL right after acknowledging; the restarted server has every item."""
    import shutil

    shutil.copytree(index_dir, tmp_path / "ix")
    code = f"""
import sys, time
from latenthash.server.app import ServerConfig, create_server
from latenthash.server.wal import FILE_MAGIC
server, port = create_server(ServerConfig(index={str(tmp_path / 'ix')!r}, model={str(onnx_model)!r}, port=0))
print(port, flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with Client(f"127.0.0.1:{port}") as c:
            assert c.upsert(np.arange(7000, 7020), images=list(small_fashion.test.images[:20])) == (20, 0)
            assert c.delete([0, 1]) == (2, 0)
    finally:
        proc.kill()
        proc.wait()
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), model=str(onnx_model), port=0))
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert c.stats().count == N_DB + 20 - 2
            assert len(c.get(np.arange(7000, 7020)).ids) == 20
            with pytest.raises(NotFound):
                c.get([0])
    finally:
        server.stop(1)
    reopened = HashIndex.open(tmp_path / "ix")  # graceful stop saved the index and emptied the log
    assert len(reopened) == N_DB + 18 and (tmp_path / "ix" / "wal.log").read_bytes() == FILE_MAGIC


def test_graceful_shutdown_finishes_in_flight_calls(index_dir, onnx_model, tmp_path, small_fashion):
    """An Upsert stream (items by code + feature) is in flight when the server stops: new calls are refused with
    UNAVAILABLE at once, the in-flight one completes and is acknowledged, and what it wrote is on disk after."""
    import shutil
    import threading

    shutil.copytree(index_dir, tmp_path / "ix")
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), model=str(onnx_model), port=0))
    enc = Encoder.open(onnx_model).encode(small_fashion.test.images[:2])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    started, release, results = threading.Event(), threading.Event(), []

    def items():
        for j in range(2):
            if j == 1:
                started.set()
                release.wait(20)
            yield pb.UpsertItem(id=9000 + j, code=enc.codes[j].tobytes(), feature=enc.features[j].tolist(),
                                metadata_json=json.dumps({"j": j}))

    upsert = threading.Thread(target=lambda: results.append(
        pb_grpc.HashSearchStub(channel).Upsert(items(), timeout=30)))
    upsert.start()
    assert started.wait(20)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 30})
    stopper.start()
    time.sleep(0.5)  # the stop has begun: new calls are refused
    with pytest.raises(Unavailable):
        Client(f"127.0.0.1:{port}", timeout=5).stats()
    release.set()
    upsert.join(30)
    stopper.join(60)
    assert results and (results[0].upserted, results[0].replaced) == (2, 0)  # acknowledged...
    stored = HashIndex.open(tmp_path / "ix")  # ...and persisted by the stop
    assert len(stored) == N_DB + 2
    got = stored.get([9000, 9001])
    np.testing.assert_array_equal(got.codes, enc.codes)
    np.testing.assert_allclose(got.features, enc.features, atol=2e-3)  # float16 storage
    assert got.metadata == [{"j": 0}, {"j": 1}]
    channel.close()


def test_metrics_endpoint(index_dir, onnx_model, tmp_path):
    import shutil
    import urllib.request

    shutil.copytree(index_dir, tmp_path / "ix")
    server, port = create_server(ServerConfig(index=str(tmp_path / "ix"), model=str(onnx_model), port=0,
                                              metrics_port=0))
    try:
        Client(f"127.0.0.1:{port}").stats()
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()
        assert 'latenthash_requests_total{code="OK",method="Stats"} 1.0' in text
        assert f"latenthash_index_items {float(N_DB)}" in text
    finally:
        server.stop(1)


def test_stubs_are_fresh():
    proc = subprocess.run([sys.executable, "proto/generate.py", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_hostile_images_are_invalid_argument_on_every_image_path(served):
    """Issue 17 cases 6 and 7: decompression bombs, broken chunks, unsupported modes and images over the pixel limit
    answer INVALID_ARGUMENT on Search, SearchStream, Upsert and Encode, and the server keeps serving."""
    from test_export_encoder import hostile_images

    server, client, embedded, _ = served
    stub = pb_grpc.HashSearchStub(client.channel)
    for name, data in hostile_images().items():
        calls = [lambda: stub.Search(pb.SearchRequest(query=pb.Query(image=data), k=3), timeout=10),
                 lambda: list(stub.SearchStream(iter([pb.SearchRequest(query=pb.Query(image=data), k=3)]),
                                                timeout=10)),
                 lambda: stub.Upsert(iter([pb.UpsertItem(id=1, image=data)]), timeout=10),
                 lambda: stub.Encode(pb.EncodeRequest(images=[data]), timeout=10)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert client.stats().count == N_DB


def test_error_class_and_request_index_travel_both_ways(served):
    """The class a server raised comes back as that class (DataError and ModelMismatch share FAILED_PRECONDITION),
    with the failing request's index as a field, also past the client's own chunking."""
    from latenthash import errors
    from latenthash.channel import rpc_error as _error

    server, client, embedded, _ = served
    good = pb.SearchRequest(query=pb.Query(code=b"\x00" * 3), k=3)
    bad = pb.SearchRequest(query=pb.Query(code=b"\x00" * 2), k=3)
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.HashSearchStub(client.channel).SearchBatch(pb.SearchBatchRequest(requests=[good, good, bad]))
    back = _error(info.value)
    assert type(back) is InvalidInput and back.request_index == 2 and "code has 2 bytes" in str(back)
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LatentHashError)]
    assert len(classes) == 16  # every class of the family, the base included
    for cls in classes:
        exc = cls("boom").at(7)

        class Fake(grpc.RpcError):
            def code(self):
                return getattr(grpc.StatusCode, exc.grpc_code)

            def details(self):
                return str(exc)

            def trailing_metadata(self):
                return errors.to_trailers(exc)

        back = _error(Fake())
        assert type(back) is cls and back.request_index == 7 and str(back).startswith("request 7: boom")


def test_one_interface_one_answer(served, small_fashion):
    """The same script of calls through `SearchAPI` on the embedded Searcher, the Client and the AsyncClient
    (awaited): every answer equal, hit for hit."""
    import asyncio

    from latenthash.api import SearchAPI

    server, client, embedded, _ = served
    queries = small_fashion.test.images[:6]
    enc = embedded.encode(queries)

    def script(api: SearchAPI) -> list:
        return [api.search(images=queries, k=8), api.search(images=queries, k=5, label="3"),
                api.search(codes=enc.codes, features=enc.features, k=10, pool=40),
                api.search(codes=enc.codes[:1], k=4, rerank=False), api.get([1, 2]), api.encode(list(queries[:2])),
                api.stats()]

    def plain(answers: list) -> list:
        *results, items, encoded, stats = answers
        return results + [items.metadata, encoded.codes, stats.count]

    async def remote_async() -> list:
        async with AsyncClient(f"127.0.0.1:{server_port}") as aclient:
            assert isinstance(aclient, SearchAPI)
            return plain([await call for call in script(aclient)])

    server_port = client.channel._channel.target().decode().rsplit(":", 1)[1]
    assert isinstance(embedded, SearchAPI) and isinstance(client, SearchAPI)
    want = plain(script(embedded))
    for got in (plain(script(client)), asyncio.run(remote_async())):
        for a, b in zip(want, got):
            if hasattr(a, "ids"):
                assert_same_results(a, b)
            else:
                np.testing.assert_array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
