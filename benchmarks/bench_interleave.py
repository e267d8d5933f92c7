"""Search by image in one process, as the Searcher facade and the server run it: an ONNX Runtime encode, then the
index's two-step search, on the same cores, for each spinning policy of the ONNX Runtime runtime side by side.

    python benchmarks/bench_interleave.py --run RUN [--copies 0] [--queries 200] [--reps 5] [--threads 2]

ONNX Runtime's intra-op threads busy-wait for work after a run by default, and a search that follows the encode
finds its cores taken. For each policy (`runtimes.onnxruntime.SPINNING`: "run", the default, spins only while a run
lasts; "always" is ONNX Runtime's own default; "never") this times, from the main thread, one image and a batch of
64: the encode alone (encodes back to back), the search alone (searches back to back, by the codes and features
the model gave; the first of them follows the encodes), and search by image (encode, then search; the search's
own part reported beside the pair). The index is the run's training set (with `--copies` shifted/mirrored
copies of each image, as bench_search builds it), default pool, k = 10; medians over queries and repetitions, the
policies alternating by repetition.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from bench_search import copies_database
from common import load_note, save

BATCH = 64
BATCH_REPS = 8  # batches of each kind per repetition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a training run folder holding model.onnx")
    ap.add_argument("--copies", type=int, default=0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(load_note())

    from latenthash import HashIndex
    from latenthash import kernels as K
    from latenthash.cpu import cpu_info
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.train import load_model
    from latenthash.runtimes.onnxruntime import SPINNING

    model = Path(args.run) / "model.onnx"
    _, ckpt = load_model(args.run)
    ds = load_dataset(ckpt["dataset"])
    encoders = {p: Encoder.open(model, runtime="onnxruntime", threads=args.threads, spinning=p) for p in SPINNING}
    codes, feats, _ = copies_database(args.run, encoders["run"], ds.train.images, ds.train.labels, args.copies)
    K.set_threads(args.threads)
    index = HashIndex(bits=encoders["run"].bits, feature_dim=feats.shape[1])
    index.add(np.arange(len(codes)), codes, feats)
    index.warmup()
    images = ds.test.images[:max(args.queries, BATCH)]
    q = encoders["run"].encode(images)

    times: dict = {p: {} for p in SPINNING}

    def note(policy: str, what: str, seconds: float) -> None:
        times[policy].setdefault(what, []).append(seconds * 1e3)

    def one_policy(policy: str) -> None:
        enc = encoders[policy]
        for i in range(args.queries):  # encodes back to back
            t0 = time.perf_counter()
            enc.encode(images[i:i + 1])
            note(policy, "encode 1", time.perf_counter() - t0)
        for i in range(args.queries):  # searches back to back
            t0 = time.perf_counter()
            index.search(q.codes[i], 10, features=q.features[i])
            note(policy, "search 1", time.perf_counter() - t0)
        for i in range(args.queries):  # search by image
            t0 = time.perf_counter()
            e = enc.encode(images[i:i + 1])
            t1 = time.perf_counter()
            index.search(e.codes[0], 10, features=e.features[0])
            t2 = time.perf_counter()
            note(policy, "by image 1", t2 - t0)
            note(policy, "its search 1", t2 - t1)
        batch = images[:BATCH]
        for _ in range(BATCH_REPS):
            t0 = time.perf_counter()
            enc.encode(batch)
            note(policy, "encode 64", time.perf_counter() - t0)
        for _ in range(BATCH_REPS):
            t0 = time.perf_counter()
            index.search(q.codes[:BATCH], 10, features=q.features[:BATCH])
            note(policy, "search 64", time.perf_counter() - t0)
        for _ in range(BATCH_REPS):
            t0 = time.perf_counter()
            e = enc.encode(batch)
            t1 = time.perf_counter()
            index.search(e.codes, 10, features=e.features)
            t2 = time.perf_counter()
            note(policy, "by image 64", t2 - t0)
            note(policy, "its search 64", t2 - t1)

    for policy in SPINNING:  # warm-up: every encoder's first runs, every kernel's first call
        one_policy(policy)
    times = {p: {} for p in SPINNING}
    for _ in range(args.reps):
        for policy in SPINNING:
            one_policy(policy)

    columns = ("encode 1", "search 1", "by image 1", "its search 1", "encode 64", "search 64", "by image 64",
               "its search 64")
    result = {"n": len(codes), "threads": args.threads, "queries": args.queries, "reps": args.reps,
              "ms": {p: {c: statistics.median(times[p][c]) for c in columns} for p in SPINNING}}
    print(f"{len(codes):,} items, {args.threads} threads, medians in ms")
    print("| spinning | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for p in SPINNING:
        print(f"| {p} | " + " | ".join(f"{result['ms'][p][c]:.3f}" for c in columns) + " |")
    print(load_note("after"))
    print("saved", save(f"interleave_{len(codes)}_t{args.threads}_{cpu_info()['llvm_cpu']}", result))


if __name__ == "__main__":
    main()
