"""Scale-out figures: bulk encoding on Ray Data against the single-process indexer, and the Milvus backend's search
latency next to the embedded backend's.

    python benchmarks/bench_scale.py ingest --model runs/fm48/model.onnx [--images 20000]
    python benchmarks/bench_scale.py search [--n 200000] [--queries 100]
    python benchmarks/bench_scale.py server --run runs/fm48 [--copies 15] [--queries 200]

ingest: the first N Fashion-MNIST training images into an embedded index, `add_images` (one ONNX Runtime session
using every core) against `add_images_ray` (a local Ray, one single-threaded encoder actor per core); Ray's start-up
is timed apart. search: N random 48-bit codes with 256-d features in milvus-lite and in HashIndex; medians over
single queries for the exact Hamming top-100 and the two-step search (pool 1000, k 10). server: the ~1M database of
bench_search.py's fidelity part (the training images and mirrored / shifted copies, encoded by the run's model) on a
real Milvus server (benchmarks/milvus_server.py, or --uri) against the embedded index: the load, a new client's
open (the codeword dictionary read back), exact Hamming top-100 (recall: the share of returned distances equal to
the exact ones, since learned codes tie heavily) and the two-step search (recall@10 against exhaustive cosine, and
the share of queries answered with fewer than k hits, which a filtered approximate index can do) at several pools
with the default FLAT feature index, Strong reads, then IVF_FLAT and HNSW feature indexes at several nprobe / ef;
medians over single queries. Prints markdown tables and writes results/scale_*.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from common import median_ms, save


def ingest(args) -> None:
    import ray

    from latenthash import HashIndex
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_fashion_mnist
    from latenthash.ingest import add_images
    from latenthash.ray_ingest import add_images_ray

    images = load_fashion_mnist().train.images[: args.images]
    ids = np.arange(len(images))
    enc = Encoder.open(args.model)
    rows = {}
    for _rep in range(2):
        index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
        t0 = time.perf_counter()
        add_images(index, enc, images, ids=ids, progress=False)
        rows.setdefault("single process (ORT, all cores)", []).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        for _rep in range(2):
            index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
            t0 = time.perf_counter()
            add_images_ray(index, args.model, ids=ids, images=images, batch_size=args.batch_size, progress=False)
            rows.setdefault(f"Ray Data ({os.cpu_count()} actors x 1 thread)", []).append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    base = min(next(iter(rows.values())))
    print(f"{len(images):,} images, model {args.model}; Ray batches of {args.batch_size}; "
          f"Ray start-up {ray_start:.1f} s (not included)\n")
    print("| indexer | best wall s | images/s | vs single process |\n|---|---|---|---|")
    for name, times in rows.items():
        best = min(times)
        print(f"| {name} | {best:.2f} | {len(images) / best:,.0f} | {base / best:.2f}x |")
    save("scale_ingest", {"images": len(images), "ray_start_s": ray_start, "seconds": rows})


def search(args) -> None:
    from latenthash import HashIndex, open_index

    rng = np.random.default_rng(0)
    n, bits, dim = args.n, 48, 256
    codes = np.packbits(rng.integers(0, 2, (n, bits), dtype=np.uint8), axis=1)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    qc = np.packbits(rng.integers(0, 2, (args.queries, bits), dtype=np.uint8), axis=1)
    qf = rng.normal(size=(args.queries, dim)).astype(np.float32)
    emb = HashIndex(bits=bits, feature_dim=dim)
    emb.add(np.arange(n), codes, feats)
    emb.warmup()
    with tempfile.TemporaryDirectory() as tmp:
        mil = open_index(f"milvus-lite://{tmp}/bench.db/items", bits=bits, feature_dim=dim, create=True)
        t0 = time.perf_counter()
        for lo in range(0, n, 20000):
            mil.add(np.arange(lo, min(n, lo + 20000)), codes[lo:lo + 20000], feats[lo:lo + 20000])
        mil.save()
        load_s = time.perf_counter() - t0
        rows = []
        for name, call in (
            ("exact Hamming top-100", lambda ix: lambda q: ix.search(qc[q], 100)),
            ("two-step, pool 1000, k 10", lambda ix: lambda q: ix.search(qc[q], 10, features=qf[q], pool=1000)),
        ):
            rows.append((name, median_ms(call(emb), len(qc)), median_ms(call(mil), len(qc))))
        mil.close()
    print(f"N = {n:,} random {bits}-bit codes with {dim}-d features; {args.queries} single queries, medians; "
          f"Milvus load {load_s:.0f} s\n")
    print("| query | embedded ms | milvus-lite ms | milvus / embedded |\n|---|---|---|---|")
    for name, e, m in rows:
        print(f"| {name} | {e:.3f} | {m:.2f} | {m / e:.0f}x |")
    save("scale_search", {"n": n, "load_s": load_s, "rows": rows})


def server(args) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_search import copies_database
    from milvus_server import milvus_server

    from latenthash import HashIndex, open_index
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.train import load_model
    from latenthash.milvus import HNSW_BUILD, MilvusIndex

    _, ckpt = load_model(args.run)
    ds = load_dataset(ckpt["dataset"])
    enc = Encoder.open(Path(args.run) / "model.onnx")
    codes, feats, _ = copies_database(args.run, enc, ds.train.images, ds.train.labels, args.copies)
    codes, feats = codes[:args.n], feats[:args.n]
    n, bits, dim = len(codes), enc.bits, enc.feature_dim
    q = enc.encode(ds.test.images[:args.queries])
    emb = HashIndex(bits=bits, feature_dim=dim)
    emb.add(np.arange(n), codes, feats)
    emb.warmup()
    stored = emb.get(np.arange(n)).features
    qn = q.features / np.linalg.norm(q.features, axis=1, keepdims=True)
    truth10 = [np.argsort(-(stored @ qn[i]))[:10] for i in range(len(qn))]
    exact100 = emb.search(q.codes, 100).distances
    del stored

    def measure(ix, label: str, queries: list[tuple[str, dict]], count: int = len(q.codes)) -> list[dict]:
        out = []
        for what, kwargs in queries:
            def call(i: int, kwargs: dict = kwargs):
                if "pool" in kwargs:
                    return ix.search(q.codes[i], 10, features=q.features[i], pool=kwargs["pool"])
                return ix.search(q.codes[i], kwargs["k"])
            times, recall, short = [], [], 0
            call(0)
            for i in range(count):
                t0 = time.perf_counter()
                res = call(i)
                times.append(time.perf_counter() - t0)
                short += int(res.counts[0] < res.ids.shape[1])
                if "pool" not in kwargs:
                    recall.append(float((np.sort(res.distances[0]) == exact100[i]).mean()))
                else:
                    recall.append(len(np.intersect1d(res.ids[0], truth10[i])) / 10)
            row = {"backend": label, "query": what, "ms": statistics.median(times) * 1e3,
                   "recall": float(np.mean(recall)), "short": short / count, "queries": count}
            print(f"| {label} | {what} | {row['ms']:.2f} | {row['recall']:.4f} | {row['short']:.3f} |", flush=True)
            out.append(row)
        return out

    exact = [("exact Hamming top-100", {"k": 100})]
    twostep = [("two-step k 10, default pool", {"pool": None}), ("two-step k 10, pool 1,000", {"pool": 1000}),
               ("two-step k 10, pool 30,000", {"pool": 30000})]
    print(f"{n:,} items ({bits}-bit learned codes, {dim}-d features), {len(q.codes)} single queries, medians; "
          f"recall: exact Hamming = share of the exact top-100's distances, two-step = recall@10 against "
          f"exhaustive cosine\n")
    print("| backend | query | ms/query | recall | queries short of k |\n|---|---|---|---|---|")
    rows = measure(emb, "embedded HashIndex", exact + twostep)
    with tempfile.TemporaryDirectory() as tmp, \
            (nullcontext(args.uri.rstrip("/")) if args.uri else milvus_server(tmp)) as uri:
        t0 = time.perf_counter()
        mil = open_index(f"{uri}/bench", bits=bits, feature_dim=dim, create=True)
        for lo in range(0, n, 10000):
            mil.add(np.arange(lo, min(n, lo + 10000)), codes[lo:lo + 10000], feats[lo:lo + 10000])
        mil.save()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = MilvusIndex(f"{uri}/bench")  # a restarted client: reads the codeword dictionary back
        open_s = time.perf_counter() - t0
        assert again.codebook.counts() == mil.codebook.counts()
        again.close()
        print(f"| (load of {n:,} rows through the SDK: {load_s:.0f} s; a new client's open, the codeword "
              f"dictionary ({len(mil.codebook):,} codewords) read back: {open_s:.1f} s) | | | | |", flush=True)
        rows += measure(mil, "Milvus FLAT (default)", exact + twostep)
        strong = MilvusIndex(f"{uri}/bench", consistency="Strong")
        rows += measure(strong, "Milvus FLAT, Strong reads", twostep[:1], count=min(50, len(q.codes)))
        strong.close()
        client = mil._client
        for kind, build, searches in (("IVF_FLAT", {"nlist": args.nlist}, [{"nprobe": p} for p in args.nprobe]),
                                      ("HNSW", HNSW_BUILD, [{"ef": e} for e in args.ef])):
            if kind not in args.feature_index:
                continue
            t0 = time.perf_counter()
            client.release_collection("bench")
            client.drop_index("bench", "feature")
            params = client.prepare_index_params()
            params.add_index("feature", index_type=kind, metric_type="IP", params=build)
            client.create_index("bench", params)
            client.load_collection("bench")
            build_s = time.perf_counter() - t0
            for search in searches:
                ix = MilvusIndex(f"{uri}/bench", **search)
                label = f"Milvus {kind} {build}, {search} (build {build_s:.0f} s)"
                rows += [r | {"build_s": build_s} for r in measure(ix, label, twostep[:2])]
                ix.close()
        mil.close()
    save("scale_server", {"n": n, "load_s": load_s, "open_s": open_s, "codewords": len(mil.codebook),
                          "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--model", required=True)
    a.add_argument("--images", type=int, default=20000)
    a.add_argument("--batch-size", type=int, default=1024, help="rows per Ray Data batch")
    b = sub.add_parser("search")
    b.add_argument("--n", type=int, default=200_000)
    b.add_argument("--queries", type=int, default=100)
    c = sub.add_parser("server")
    c.add_argument("--run", required=True, help="a trained and exported run (runs/fm48)")
    c.add_argument("--copies", type=int, default=15)
    c.add_argument("--n", type=int, default=1_000_000, help="at most this many items of the database")
    c.add_argument("--queries", type=int, default=200)
    c.add_argument("--uri", help="a running Milvus server (milvus://host:port) instead of starting one")
    c.add_argument("--feature-index", nargs="*", default=["IVF_FLAT", "HNSW"], choices=["IVF_FLAT", "HNSW"],
                   help="feature index types measured after FLAT (each rebuilds the feature index)")
    c.add_argument("--nlist", type=int, default=1024, help="IVF_FLAT lists")
    c.add_argument("--nprobe", type=int, nargs="+", default=[16, 128])
    c.add_argument("--ef", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    {"ingest": ingest, "search": search, "server": server}[args.what](args)


if __name__ == "__main__":
    main()
