"""The two-step search against graph indexes over the very same features.

    python benchmarks/bench_peers.py --run RUN_DIR [--copies 15] [--queries 1000] [--threads 1] [--interleave]

The database: the run's training images (with `--copies`, mirrored / shifted copies of each, as in
`bench_search.py fidelity`), encoded by its exported model.onnx; queries: test images. Truth: the exact top-10 by
cosine over the float32 features (faiss IndexFlatIP). Each method runs in a process of its own (memory is the
growth of that process's resident set while it builds, after a first build that pays imports and compilation, with
glibc's mmap threshold low so that freed temporaries leave it; see `mmap_threshold`):

- latenthash two-step (the embedded HashIndex, default float16 features), over its pool knob, and the same with
  int8 features (latenthash-i8); beside each, the recall of an exhaustive cosine search over the features as the
  index stores them (its ceiling);
- latenthash codes only (no features stored: the exact Hamming top-10);
- faiss IndexHNSWFlat, M 16 and 32 (efConstruction 40, its default), over efSearch;
- usearch HNSW (connectivity 16) with f16 and i8 vectors, over its search expansion (skipped if not installed).

For each setting: median ms per single query and recall@10, then one batch of all queries (ms per query). Build
time, bytes per item in memory (and on disk where the library saves), and the cost of deleting 1% of the items
and inserting them again under new ids, with recall after (faiss's HNSW cannot delete). Every thread count is set
explicitly (`--threads`, default 1; BLAS too). Plots recall against time per method. Results and plot:
peers_N_tTHREADS_CPU.json / .png (CPU: LLVM's name for this CPU kind; a run of some `--methods` adds their names) in
benchmarks/results/ and benchmarks/plots/.

`--interleave` measures speed and recall only, of latenthash (float16 and int8 features) and faiss M16 / M32 in one
process, every setting's queries in blocks of INTERLEAVE that alternate with every other setting's, so that the
host's drift (which moves one process's times against another's by more than some differences read here) falls on
all of them alike; each round of blocks starts each method at another of its settings (the first block after a
switch of index read 4-8 us slower, untimed warm-up queries or not: without the rotation that fell on one setting
every round); it prints, per recall target, the fastest setting of each and their ratio (and saves them with
the curves: peers_N_tTHREADS_CPU_interleaved.json).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_search import VARIANTS
from common import load_note, save, save_figure

from latenthash.cpu import cpu_info

K = 10
CHURN = 0.01
INTERLEAVE = 100  # queries per block of one setting in `--interleave` (blocks of every setting alternate)
TARGETS = (0.95, 0.99)  # the recall targets of issue 30's bars
INTERLEAVED = ("latenthash", "latenthash-i8", "faiss-hnsw16", "faiss-hnsw32")  # usearch and faiss crash in one process
TWO_STEP = ("latenthash", "latenthash-i8")  # the methods with features (the others: codes only, peers)
POOLS = [1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12000, 14000, 16000, 18000,
         20000, 50000]
SETTINGS = {
    # each curve sampled finely enough near recall 0.95 and 0.99 that the crossing is read, not interpolated
    "latenthash": POOLS,
    "latenthash-i8": POOLS,
    "latenthash-codes": [None],
    "faiss-hnsw16": [16, 20, 24, 32, 48, 64, 96, 128, 256],  # efSearch
    "faiss-hnsw32": [16, 20, 24, 32, 48, 64, 96, 128, 256],
    "usearch-f16": [16, 20, 24, 32, 48, 64, 96, 128, 256],  # expansion_search
    "usearch-i8": [16, 20, 24, 32, 48, 64, 96, 128, 256],
}


def mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD: allocations from this size on are mapped and unmapped on their own. Low while a
    method builds, so that freed temporaries leave the resident set (glibc's adaptive threshold otherwise keeps
    large freed blocks in the heap); high while it searches, as glibc's adaptive threshold would have it (a low one
    maps, faults in and unmaps every large per-query array: measured 1.7x slower at 960k)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except (OSError, AttributeError):  # not glibc: resident sets then include the allocator's leftovers
        pass


def rss() -> int:
    """This process's resident set in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def database(run_dir: str, copies: int, n_queries: int, path: Path) -> None:
    """Codes, features and queries of the run's model, and the exact cosine top-K, into one .npz for the workers."""
    import faiss
    from bench_search import copies_database

    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.train import load_model

    _, ckpt = load_model(run_dir)
    ds = load_dataset(ckpt["dataset"])
    enc = Encoder.open(Path(run_dir) / "model.onnx")
    codes, feats, _ = copies_database(run_dir, enc, ds.train.images, ds.train.labels, copies)
    q = enc.encode(ds.test.images[:n_queries])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    qunit = q.features / np.linalg.norm(q.features, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(unit.shape[1])
    flat.add(unit.astype(np.float32))
    _, truth = flat.search(qunit.astype(np.float32), K)
    np.savez(path, codes=codes, features=feats.astype(np.float32), qcodes=q.codes, qfeatures=q.features,
             truth=truth, bits=enc.bits)


def exact_top(stored: np.ndarray, qunit: np.ndarray, chunk: int = 100) -> np.ndarray:
    """The exhaustive cosine top-K over rows as an index stores them (ties by row), a few queries at a time."""
    out = []
    for lo in range(0, len(qunit), chunk):
        s = qunit[lo:lo + chunk] @ stored.T
        top = np.argpartition(-s, K, axis=1)[:, :K]
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / K for f, t in zip(found, truth)]))


class Method:
    """What the worker needs of each library: build, one query, a batch, delete + insert (or None)."""

    def __init__(self, name: str, z, threads: int):
        self.name, self.threads = name, threads
        self.codes, self.feats = z["codes"], z["features"]
        self.unit = self.feats / np.linalg.norm(self.feats, axis=1, keepdims=True)
        self.bits = int(z["bits"])

    def build(self) -> None:
        n, d = self.feats.shape
        if self.name.startswith("latenthash"):
            from latenthash import HashIndex, kernels

            kernels.set_threads(self.threads)
            with_features = self.name in TWO_STEP
            self.index = HashIndex(bits=self.bits, feature_dim=d if with_features else None,
                                   feature_dtype="int8" if self.name == "latenthash-i8" else "float16")
            self.index.add(np.arange(n), self.codes, self.feats if with_features else None)
            self.index.warmup()  # the bucket and sketch build, as a server does before it serves
        elif self.name.startswith("faiss"):
            import faiss

            faiss.omp_set_num_threads(self.threads)
            self.index = faiss.IndexHNSWFlat(d, int(self.name.removeprefix("faiss-hnsw")), faiss.METRIC_INNER_PRODUCT)
            self.index.add(self.unit)
        else:
            from usearch.index import Index

            self.index = Index(ndim=d, metric="cos", dtype=self.name.removeprefix("usearch-"), connectivity=16)
            self.index.add(np.arange(n), self.unit, threads=self.threads)

    def set(self, value) -> None:
        if self.name.startswith("faiss"):
            self.index.hnsw.efSearch = value
        elif self.name.startswith("usearch"):
            self.index.expansion_search = value
        self.value = value

    def search(self, qcodes: np.ndarray, qfeats: np.ndarray) -> np.ndarray:
        """Ids (Q, K) of a batch (Q may be 1)."""
        if self.name in TWO_STEP:
            one = len(qcodes) == 1
            return self.index.search(qcodes[0] if one else qcodes, k=K, features=qfeats[0] if one else qfeats,
                                     pool=self.value).ids
        if self.name == "latenthash-codes":
            return self.index.search(qcodes[0] if len(qcodes) == 1 else qcodes, k=K).ids
        if self.name.startswith("faiss"):
            return self.index.search(qfeats, K)[1]
        return np.atleast_2d(self.index.search(qfeats, K, threads=self.threads).keys).astype(np.int64)

    def churn(self, gone: np.ndarray, new_ids: np.ndarray) -> float | None:
        """Delete the rows `gone` and insert the same items under `new_ids`; seconds until searches use them."""
        if self.name.startswith("faiss"):
            return None  # IndexHNSWFlat has no deletion
        t0 = time.perf_counter()
        if self.name.startswith("latenthash"):
            self.index.remove(gone)
            self.index.add(new_ids, self.codes[gone], self.feats[gone] if self.name in TWO_STEP else None)
            self.index.warmup()  # buckets and sketches of the new snapshot (a background job in a server)
        else:
            self.index.remove(gone)
            self.index.add(new_ids, self.unit[gone], threads=self.threads)
        return time.perf_counter() - t0

    def disk_bytes(self) -> int | None:
        with tempfile.TemporaryDirectory() as tmp:
            if self.name.startswith("latenthash"):
                self.index.save(Path(tmp) / "ix")
            elif self.name.startswith("faiss"):
                import faiss

                faiss.write_index(self.index, str(Path(tmp) / "ix"))
            else:
                self.index.save(str(Path(tmp) / "ix"))
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def worker(name: str, data: str, threads: int) -> dict:
    z = dict(np.load(data))
    qcodes, qfeats, truth = z["qcodes"], z["qfeatures"], z["truth"]
    qunit = (qfeats / np.linalg.norm(qfeats, axis=1, keepdims=True)).astype(np.float32)
    # a build and search first: imports, Numba's compilation (a whole first build: ~40 MB of it the first time) and
    # thread pools are not the index's memory; the graph builds are warmed by a small one
    small = {k: v[:2048] if k in ("codes", "features") and not name.startswith("latenthash") else v
             for k, v in z.items()}
    # low from the start: the first build's large arrays then leave the resident set when freed, where glibc's
    # adaptive threshold would keep them in its heap for the second build to reuse (understating its growth)
    mmap_threshold(128 << 10)
    warm = Method(name, small, threads)
    warm.build()
    warm.set(SETTINGS[name][0])
    warm.search(qcodes[:1], qfeats[:1] if name.startswith("latenthash") else qunit[:1])
    del warm
    m = Method(name, z, threads)
    n = len(m.codes)
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    m.build()
    build_s = time.perf_counter() - t0
    gc.collect()
    out = {"method": name, "n": n, "threads": threads, "build_s": build_s,
           "memory_bytes_per_item": (rss() - before) / n, "disk_bytes_per_item": m.disk_bytes() / n, "rows": []}
    mmap_threshold(32 << 20)
    feed = qunit if not name.startswith("latenthash") else qfeats
    for value in SETTINGS[name]:
        m.set(value)
        for i in range(3):  # warm-up
            m.search(qcodes[i:i + 1], feed[i:i + 1])
        times, found = [], []
        for i in range(len(qcodes)):
            t = time.perf_counter()
            found.append(m.search(qcodes[i:i + 1], feed[i:i + 1])[0])
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        batch = m.search(qcodes, feed)
        batch_s = time.perf_counter() - t
        out["rows"].append({"setting": value, "ms": statistics.median(times) * 1e3, "recall": recall(np.array(found),
                            truth), "batch_ms": batch_s * 1e3 / len(qcodes), "batch_recall": recall(batch, truth)})
    if name in TWO_STEP:  # after the timings: numpy's BLAS threads spin for a while after a product
        out["exact_over_stored"] = recall(exact_top(m.index.get(np.arange(n)).features, qunit), truth)
    # churn at the setting whose recall is nearest 0.99 (the operating point the bars name)
    best = min(out["rows"], key=lambda r: abs(r["recall"] - 0.99))
    m.set(best["setting"])
    rng = np.random.default_rng(0)
    gone = rng.choice(n, int(n * CHURN), replace=False)
    new_ids = np.arange(n, n + len(gone))
    churn_s = m.churn(gone, new_ids)
    if churn_s is not None:
        moved = dict(zip(gone.tolist(), new_ids.tolist()))
        truth_after = np.vectorize(lambda i: moved.get(int(i), int(i)))(truth)
        found = np.array([m.search(qcodes[i:i + 1], feed[i:i + 1])[0] for i in range(len(qcodes))])
        out["churn"] = {"setting": best["setting"], "seconds": churn_s, "recall_before": best["recall"],
                        "recall_after": recall(found, truth_after)}
    return out


def interleaved(data: str, threads: int) -> list[dict]:
    """Speed and recall of every setting of INTERLEAVED, built in this one process and measured in blocks of
    INTERLEAVE queries, each block of every setting in turn, each round starting each method at its next setting
    (see the module's docstring)."""
    z = dict(np.load(data))
    qcodes, qfeats, truth = z["qcodes"], z["qfeatures"], z["truth"]
    qunit = (qfeats / np.linalg.norm(qfeats, axis=1, keepdims=True)).astype(np.float32)
    methods = {name: Method(name, z, threads) for name in INTERLEAVED}
    for m in methods.values():
        m.build()
    runs = [(name, value) for name in INTERLEAVED for value in SETTINGS[name]]
    times: dict[tuple, list[float]] = {run: [] for run in runs}
    found = {run: np.empty((len(qcodes), K), np.int64) for run in runs}
    for name, value in runs:  # warm-up
        methods[name].set(value)
        methods[name].search(qcodes[:1], qfeats[:1] if name in TWO_STEP else qunit[:1])
    for block, lo in enumerate(range(0, len(qcodes), INTERLEAVE)):
        order = [(name, value) for name in INTERLEAVED
                 for value in np.roll(SETTINGS[name], -block).tolist()]  # a setting first, each round another
        for name, value in order:
            m = methods[name]
            m.set(value)
            feed = qfeats if name in TWO_STEP else qunit
            for i in range(lo, min(len(qcodes), lo + INTERLEAVE)):
                t = time.perf_counter()
                found[(name, value)][i] = m.search(qcodes[i:i + 1], feed[i:i + 1])[0]
                times[(name, value)].append(time.perf_counter() - t)
    return [{"method": name, "n": len(z["codes"]), "threads": threads,
             "rows": [{"setting": value, "ms": statistics.median(times[(name, value)]) * 1e3,
                       "recall": recall(found[(name, value)], truth)} for value in SETTINGS[name]]}
            for name in INTERLEAVED]


def fastest(results: list[dict]) -> list[dict]:
    """Per recall target and two-step method: its fastest setting that reaches the target, faiss's (either M), and
    the ratio of their times."""
    out = []
    for target in TARGETS:
        best = {}
        for r in results:
            ok = [x for x in r["rows"] if x["recall"] >= target]
            if ok:
                best[r["method"]] = min(ok, key=lambda x: x["ms"])
        peers = [(m, x) for m, x in best.items() if m.startswith("faiss")]
        for name in (m for m in TWO_STEP if m in best and peers):
            peer, x = min(peers, key=lambda p: p[1]["ms"])
            out.append({"recall": target, "method": name, name: best[name], "faiss": {"method": peer, **x},
                        "ratio": best[name]["ms"] / x["ms"]})
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        rows = r["rows"]
        style = "o-" if r["method"].startswith("latenthash") else "s--"
        ax.plot([x["ms"] for x in rows], [x["recall"] for x in rows], style, ms=4,
                label=f"{r['method']} ({r['memory_bytes_per_item']:.0f} B/item, build {r['build_s']:.1f} s)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.02, 0.05, 0.1, ... in plain decimals
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0.85, 1.002)
    ax.axhline(0.95, color="grey", lw=0.5)
    ax.axhline(0.99, color="grey", lw=0.5)
    ax.set_xlabel(f"ms per query (one query, median, {results[0]['threads']} thread(s))")
    ax.set_ylabel(f"recall@{K} against exact cosine")
    ax.set_title(f"{results[0]['n']:,} Fashion-MNIST items, the same features for every method", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    save_figure(fig, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_interleaved":
        print(json.dumps(interleaved(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run with its exported model.onnx")
    ap.add_argument("--copies", type=int, default=0, choices=range(len(VARIANTS)), metavar="0-15",
                    help="mirrored / shifted copies of each image")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(SETTINGS))
    ap.add_argument("--interleave", action="store_true",
                    help=f"speed and recall of {', '.join(INTERLEAVED)} in one process, their queries interleaved")
    args = ap.parse_args()
    print(load_note(), flush=True)
    if importlib.util.find_spec("usearch") is None:  # not imported here: it and faiss in one process crash
        print("usearch not installed (pip install usearch): its rows are skipped")
        args.methods = [m for m in args.methods if not m.startswith("usearch")]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "db.npz"
        database(args.run, args.copies, args.queries, data)
        if args.interleave:
            return interleaved_run(data, args.threads)
        results = []
        print("| method | setting | ms/query | recall@10 | batch ms/query | build s | memory B/item | disk B/item |\n|"
              + "---|" * 8)
        for name in args.methods:
            # every BLAS on the same thread count (numpy's builds latenthash's sketches)
            env = {**os.environ,
                   **{v: str(args.threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
            proc = subprocess.run([sys.executable, __file__, "_worker", name, str(data), str(args.threads)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            for x in r["rows"]:
                print(f"| {name} | {x['setting']} | {x['ms']:.3f} | {x['recall']:.4f} | {x['batch_ms']:.4f} | "
                      f"{r['build_s']:.1f} | {r['memory_bytes_per_item']:.0f} | {r['disk_bytes_per_item']:.0f} |",
                      flush=True)
            if "exact_over_stored" in r:
                print(f"| {name}: exhaustive over its stored features | | | {r['exact_over_stored']:.4f} | | | | |")
            if "churn" in r:
                c = r["churn"]
                print(f"| {name}: delete + insert {CHURN:.0%} | {c['setting']} | {c['seconds']:.2f} s | "
                      f"recall {c['recall_before']:.4f} -> {c['recall_after']:.4f} | | | | |", flush=True)
    n = results[0]["n"]
    print(load_note("after"))
    name = f"peers_{n}_t{args.threads}_{cpu_info()['llvm_cpu']}"  # the figures differ per CPU kind
    if args.methods != list(SETTINGS):  # a run of some methods keeps the whole run's file
        name += "_" + "+".join(args.methods)
    save(name, results)  # first: its stamp then sees the tree as committed
    plot(results, Path(__file__).parent / "plots" / f"{name}.png")


def interleaved_run(data: Path, threads: int) -> None:
    """`--interleave`: its worker in a process of its own (thread counts set before numpy loads), the curves and
    the fastest settings per recall target printed and saved."""
    env = {**os.environ, **{v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    proc = subprocess.run([sys.executable, __file__, "_interleaved", str(data), str(threads)], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"interleaved run failed:\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| method | setting | ms/query | recall@10 |\n|---|---|---|---|")
    for r in results:
        for x in r["rows"]:
            print(f"| {r['method']} | {x['setting']} | {x['ms']:.3f} | {x['recall']:.4f} |")
    best = fastest(results)
    for b in best:
        lh, fa = b[b["method"]], b["faiss"]
        print(f"recall >= {b['recall']}: {b['method']} pool {lh['setting']} {lh['ms']:.3f} ms ({lh['recall']:.4f}), "
              f"{fa['method']} ef {fa['setting']} {fa['ms']:.3f} ms ({fa['recall']:.4f}): {b['ratio']:.2f}x")
    print(load_note("after"))
    save(f"peers_{results[0]['n']}_t{threads}_{cpu_info()['llvm_cpu']}_interleaved",
         {"curves": results, "fastest": best})


if __name__ == "__main__":
    main()
