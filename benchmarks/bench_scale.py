"""Scale-out figures: bulk encoding on Ray Data against the single-process indexer, and the Milvus backend's search
latency next to the embedded backend's.

    python benchmarks/bench_scale.py ingest --model runs/fm48/model.onnx [--images 20000]
    python benchmarks/bench_scale.py search [--n 200000] [--queries 100]

ingest: the first N Fashion-MNIST training images into an embedded index, `add_images` (one ONNX Runtime session
using every core) against `add_images_ray` (a local Ray, one single-threaded encoder actor per core); Ray's start-up
is timed apart. search: N random 48-bit codes with 256-d features in milvus-lite (BIN_FLAT) and in HashIndex;
medians over single queries for the exact Hamming top-100 and the two-step search (pool 1000, k 10) with both Milvus
re-rank modes. Prints markdown tables and writes results/scale_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


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
    for rep in range(2):
        index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
        t0 = time.perf_counter()
        add_images(index, enc, images, ids=ids, progress=False)
        rows.setdefault("single process (ORT, all cores)", []).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        for rep in range(2):
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
    OUT.mkdir(exist_ok=True)
    (OUT / "scale_ingest.json").write_text(json.dumps({"images": len(images), "ray_start_s": ray_start,
                                                       "seconds": rows}, indent=1))


def _median_ms(fn, queries) -> float:
    fn(0)
    times = []
    for q in range(len(queries)):
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
        mil.warmup()
        rows = []
        for name, call in (
            ("exact Hamming top-100", lambda ix: lambda q: ix.search(qc[q], 100)),
            ("two-step, pool 1000, k 10", lambda ix: lambda q: ix.search(qc[q], 10, features=qf[q], pool=1000)),
        ):
            e = _median_ms(call(emb), qc)
            modes = {}
            for mode in ("fetch", "milvus") if "two-step" in name else ("milvus",):
                mil.rerank_mode = mode
                modes[mode] = _median_ms(call(mil), qc)
            rows.append((name, e, modes))
        mil.close()
    print(f"N = {n:,} random {bits}-bit codes with {dim}-d features; {args.queries} single queries, medians; "
          f"Milvus load {load_s:.0f} s\n")
    print("| query | embedded ms | milvus-lite ms (re-rank: fetch) | milvus-lite ms (re-rank: milvus) | "
          "milvus / embedded |\n|---|---|---|---|---|")
    for name, e, modes in rows:
        best = min(modes.values())
        print(f"| {name} | {e:.3f} | {modes.get('fetch', float('nan')):.2f} | {modes['milvus']:.2f} | "
              f"{best / e:.0f}x |")
    OUT.mkdir(exist_ok=True)
    (OUT / "scale_search.json").write_text(json.dumps({"n": n, "load_s": load_s, "rows": rows}, indent=1))


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
    args = ap.parse_args()
    {"ingest": ingest, "search": search}[args.what](args)


if __name__ == "__main__":
    main()
