"""Search benchmarks: exact Hamming top-k (ours vs faiss IndexBinaryFlat vs numpy vs the popcount floor), the
two-step search against exhaustive cosine search, and index open / first-query / bytes per item.

    python benchmarks/bench_search.py hamming   [--quick]
    python benchmarks/bench_search.py twostep   --run RUN_DIR
    python benchmarks/bench_search.py fidelity  --run RUN_DIR --queries 1000   (the real database, recall beside time)
    python benchmarks/bench_search.py index

Same data, same process, interleaved repetitions, medians; thread counts of Numba and faiss set explicitly.
Two OpenMP runtimes on 2 vCPUs collapse when anything else runs, so the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
from common import interleaved, load_note, save, save_figure, timed
from numba import njit, prange

from latenthash import HashIndex, kernels
from latenthash.codes import to_words
from latenthash.cpu import cpu_info
from latenthash.limits import pool_size


@njit(parallel=True, cache=True)
def floor_pass(db, q):
    """The floor: one XOR + popcount pass over every code (minimum only, no selection)."""
    n = db.shape[0]
    chunks = numba.get_num_threads()
    per = (n + chunks - 1) // chunks
    mins = np.full(chunks, 1 << 30, np.int64)
    for c in prange(chunks):
        part = db[c * per:min(n, (c + 1) * per)]
        m = np.int64(1 << 30)
        for j in range(part.shape[0]):
            m = min(m, kernels.popcount64(part[j] ^ q))
        mins[c] = m
    return mins.min()


@njit(parallel=True, cache=True)
def floor_pass_batch(db, qs):
    out = np.empty(qs.shape[0], np.int64)
    for i in prange(qs.shape[0]):
        m = np.int64(1 << 30)
        for j in range(db.shape[0]):
            m = min(m, kernels.popcount64(db[j] ^ qs[i]))
        out[i] = m
    return out


def hamming_data(bits: int, n: int, n_batch: int = 1000):
    """Uniform random packed codes, the same in every process (seeded)."""
    rng = np.random.default_rng(bits * 1000 + n)
    nb = (bits + 7) // 8
    db = rng.integers(0, 256, (n, nb), dtype=np.uint8)
    queries = rng.integers(0, 256, (n_batch, nb), dtype=np.uint8)
    if bits % 8:
        mask = np.uint8(0xFF << (8 - bits % 8) & 0xFF)
        db[:, -1] &= mask
        queries[:, -1] &= mask
    return db, queries


def measure(lib: str, bits: int, n: int, threads: int, k: int = 100) -> dict:
    """One library's single-query and batch medians (seconds) in this process; also returns result distances
    of 20 queries for the parity check across processes."""
    db, queries = hamming_data(bits, n)
    one = queries[:1]
    reps_single = 11 if n > 1_000_000 else 101  # single-query times are bimodal (thread wake-ups): many reps
    if lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        fx = faiss.IndexBinaryFlat(db.shape[1] * 8)
        fx.add(db)
        single = {"faiss": lambda: fx.search(one, k)}
        batch = {"faiss": lambda: fx.search(queries, k)}
        parity = fx.search(queries[:20], k)[0]
    else:
        kernels.set_threads(threads)
        index = HashIndex(bits=bits)
        index.add(np.arange(n), db)
        full, qfull = to_words(db, bits), to_words(queries, bits)
        # the floor: XOR + popcount of every stored word (all words of wide codes), over the index's own array so
        # that both read the same cached bytes
        words = index._snap.words[:n].reshape(-1)
        qwords = np.ascontiguousarray(qfull[:, 0])
        qone, chunks = qfull[0], kernels.single_chunks(n)
        single = {"ours": lambda: index.search(one, k=k), "floor": lambda: floor_pass(words, qwords[0]),
                  # the kernel alone: what the Python call adds is the difference
                  "kernel": lambda: kernels.topk_single(words, n, qfull.shape[1], qone, k, bits, chunks)}
        batch = {"ours": lambda: index.search(queries, k=k), "floor": lambda: floor_pass_batch(words, qwords)}
        parity = index.search(queries[:20], k=k).distances
    out = {"single": interleaved(single, reps=reps_single), "batch": interleaved(batch, reps=3)}
    if lib == "ours":  # after, not interleaved: its 8 MB temporaries would evict the codes from cache
        out["single"]["numpy"] = interleaved(
            {"numpy": lambda: np.argpartition(np.bitwise_count(full ^ qfull[0]).sum(1), k)[:k]}, reps=5)["numpy"]
    out["parity"] = np.asarray(parity).tolist()
    return out


def bench_hamming(quick: bool, only_bits: list[int] | None = None) -> list[dict]:
    """Each library in its own process (faiss and Numba each bring an OpenMP runtime whose idle threads would
    compete), processes alternated twice per configuration, the better median of the two kept."""
    configs = [(32, 1_000_000), (48, 1_000_000), (64, 1_000_000), (128, 1_000_000), (64, 10_000_000)]
    if quick:
        configs = [(48, 1_000_000), (64, 1_000_000)]
    if only_bits:
        configs = [(b, n) for b, n in configs if b in only_bits and n == 1_000_000]
    n_batch, rows = 1000, []
    for bits, n in configs:
        for threads in (1, 2):
            runs: dict[str, list[dict]] = {"ours": [], "faiss": []}
            for _ in range(2):
                for lib in ("ours", "faiss"):
                    proc = subprocess.run([sys.executable, __file__, "_measure", lib, str(bits), str(n), str(threads)],
                                          capture_output=True, text=True, check=True)
                    runs[lib].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            assert runs["ours"][0]["parity"] == runs["faiss"][0]["parity"], "distance mismatch against faiss"
            single = {m: min(r["single"][m] for r in runs[lib]) for lib in runs for m in runs[lib][0]["single"]}
            batch = {m: min(r["batch"][m] for r in runs[lib]) for lib in runs for m in runs[lib][0]["batch"]}
            row = {"bits": bits, "n": n, "threads": threads,
                   "single_ms": {m: v * 1e3 for m, v in single.items()},
                   "batch_ms_per_query": {m: v * 1e3 / n_batch for m, v in batch.items()},
                   "single_speedup_vs_faiss": single["faiss"] / single["ours"],
                   "batch_speedup_vs_faiss": batch["faiss"] / batch["ours"],
                   "single_vs_floor": single["ours"] / single["floor"]}
            rows.append(row)
            print(format_hamming_row(row), flush=True)
    return rows


def format_hamming_row(r: dict) -> str:
    s, b = r["single_ms"], r["batch_ms_per_query"]
    return (f"| {r['n']:>10,} x {r['bits']:>3} | {r['threads']} | {s['ours']:.3f} | {s['faiss']:.3f} | "
            f"{s['numpy']:.2f} | {s['floor']:.3f} | {r['single_speedup_vs_faiss']:.1f}x | {r['single_vs_floor']:.2f} | "
            f"{s['kernel'] / s['floor']:.2f} | "
            f"{b['ours']:.4f} ({1 / b['ours'] * 1e3:,.0f} q/s) | {b['faiss']:.4f} ({1 / b['faiss'] * 1e3:,.0f} q/s) | "
            f"{b['floor']:.4f} | {r['batch_speedup_vs_faiss']:.1f}x |")


HAMMING_HEADER = (
    "| N x bits | threads | one query: ours ms | faiss ms | numpy ms | floor ms | ours vs faiss | ours / floor | "
    "kernel alone / floor | batch 1000: ours ms/q | faiss ms/q | floor ms/q | ours vs faiss |\n|" + "---|" * 13)


def synthetic_database(run_dir: str, n: int, seed: int = 0):
    """1M realistic (code, feature) pairs from a trained model: the F4 features of the real database images,
    replicated with small Gaussian jitter, and codes computed from them by the model's own latent layer
    (code = W f + b >= 0), so codes and features relate as they do in the model. Queries: real test images."""
    from latenthash.export.data import load_dataset
    from latenthash.export.train import load_model, predict

    model, ckpt = load_model(run_dir)
    ds = load_dataset(ckpt["dataset"])
    _, fdb, _ = predict(model, ds.train.images)
    _, fq, _ = predict(model, ds.test.images)
    w = model.latent.weight.detach().numpy().T.astype(np.float32)
    b = model.latent.bias.detach().numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    reps = -(-n // len(fdb))
    scale = 0.05 * fdb.std(axis=0, keepdims=True)
    feats = np.concatenate([fdb + rng.standard_normal(fdb.shape).astype(np.float32) * scale * (r > 0)
                            for r in range(reps)])[:n]
    labels = np.tile(ds.train.labels, reps)[:n]
    codes = np.packbits(feats @ w + b >= 0, axis=1)
    qcodes = np.packbits(fq @ w + b >= 0, axis=1)
    return codes, feats, labels, qcodes, fq, ds.test.labels, model.config.bits


def bench_twostep(run_dir: str, n: int, n_queries: int, dtypes: list[str]) -> dict:
    """Two-step search (Hamming pool, then cosine re-rank) against exhaustive numpy cosine search, for each
    feature storage type, with the median size of step 1's pool (whole distance shells) beside each row."""
    codes, feats, _, qcodes, qf, _, bits = synthetic_database(run_dir, n)
    qcodes, qf = qcodes[:n_queries], qf[:n_queries]
    fn = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    qn = qf / np.maximum(np.linalg.norm(qf, axis=1, keepdims=True), 1e-12)
    kernels.set_threads(2)
    k = 100

    def exhaustive(i):
        s = fn @ qn[i]
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]

    truth = [set(exhaustive(i).tolist()) for i in range(n_queries)]
    t_lin = statistics.median([timed(lambda i=i: exhaustive(i), 1)[0] for i in range(min(20, n_queries))])
    out = {"n": n, "bits": bits, "feature_dim": feats.shape[1], "linear_ms": t_lin * 1e3, "rows": []}
    print(f"exhaustive cosine (numpy, float32 {feats.shape[1]}-d): {t_lin * 1e3:.2f} ms/query", flush=True)
    print("| features | pool | pool size (median) | two-step ms/query | speed-up vs exhaustive | recall@100 |\n|"
          + "---|" * 6)
    for dtype in dtypes:
        index = HashIndex(bits=bits, feature_dim=feats.shape[1], feature_dtype=dtype)
        index.add(np.arange(n), codes, feats)
        index.warmup()
        for pool in (1000, 5000, 20000):
            res = index.search(qcodes, k=k, features=qf, pool=pool)
            recall = float(np.mean([len(truth[i] & set(res.ids[i].tolist())) / k for i in range(n_queries)]))
            covered = np.cumsum(index.radius_counts(qcodes), axis=1)  # step 1: whole shells covering `pool`
            size = float(np.median(covered[np.arange(n_queries), np.argmax(covered >= pool, axis=1)]))
            t = statistics.median(timed(lambda i=i, ix=index, p=pool: ix.search(qcodes[i], k=k, features=qf[i], pool=p),
                                        1)[0] for i in range(min(100, n_queries)))
            row = {"dtype": dtype, "pool": pool, "pool_size_median": size, "ms": t * 1e3, "speedup": t_lin / t,
                   "recall_at_100": recall}
            out["rows"].append(row)
            print(f"| {dtype} | {pool:>6} | {size:.0f} | {t * 1e3:.3f} | {t_lin / t:.0f}x | {recall:.3f} |",
                  flush=True)
        del index
    return out


VARIANTS = [(m, dx, dy) for m in (False, True) for dx, dy in
            ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (2, 0))]  # mirror, shift right, down


def variant(images: np.ndarray, mirror: bool, dx: int, dy: int) -> np.ndarray:
    """Images (N, H, W, C) mirrored left-right and shifted by (dx, dy) pixels, the uncovered border zero."""
    out = np.roll(images[:, :, ::-1] if mirror else images, (dy, dx), axis=(1, 2))
    if dy > 0:
        out[:, :dy] = 0
    elif dy < 0:
        out[:, dy:] = 0
    if dx > 0:
        out[:, :, :dx] = 0
    elif dx < 0:
        out[:, :, dx:] = 0
    return out


def copies_database(run_dir: str, enc, images: np.ndarray, labels: np.ndarray, copies: int):
    """The real database grown with `copies` mirrored/shifted copies of every image (near-duplicates, as a photo
    collection holds), encoded once by the run's model and cached in the run directory."""
    model = hashlib.sha256((Path(run_dir) / "model.onnx").read_bytes()).hexdigest()[:12]
    cache = Path(run_dir) / f"copies{copies}_{model}.npz"  # tied to the model that encoded it
    if cache.exists():
        z = np.load(cache)
        return z["codes"], z["features"], z["labels"]
    codes, feats = [], []
    for mirror, dx, dy in VARIANTS[:copies + 1]:
        e = enc.encode(variant(images, mirror, dx, dy))
        codes.append(e.codes)
        feats.append(e.features)
        print(f"encoded copy mirror={mirror} shift=({dx},{dy})", flush=True)
    out = np.concatenate(codes), np.concatenate(feats), np.tile(labels, copies + 1)
    np.savez(cache, codes=out[0], features=out[1], labels=out[2])
    return out


def bench_fidelity(run_dir: str, n_queries: int, pools: list[int], k: int = 10, copies: int = 0) -> dict:
    """The two-step search on the real database (the training images, encoded by the run's exported model.onnx,
    optionally with `copies` mirrored/shifted copies of each) against exhaustive cosine search over the same
    stored features: recall@k beside every time, over the pool knob, single queries, medians; class precision@k
    beside. Draws recall against time as a PNG."""
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.train import load_model

    _, ckpt = load_model(run_dir)
    ds = load_dataset(ckpt["dataset"])
    enc = Encoder.open(Path(run_dir) / "model.onnx")
    q = enc.encode(ds.test.images[:n_queries])
    if copies:
        codes, features, labels = copies_database(run_dir, enc, ds.train.images, ds.train.labels, copies)
    else:
        db = enc.encode(ds.train.images)
        codes, features, labels = db.codes, db.features, ds.train.labels
    n = len(codes)
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)  # the default storage (float16)
    index.add(np.arange(n), codes, features)
    del features
    index.warmup()
    stored = index.get(np.arange(n)).features  # what the index ranks by, as float32, L2-normalized
    qn = q.features / np.linalg.norm(q.features, axis=1, keepdims=True)
    qlabels = ds.test.labels[:n_queries]

    def exhaustive(i):
        s = stored @ qn[i]
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]

    truth = [exhaustive(i) for i in range(n_queries)]
    kernels.set_threads(2)
    t_lin = statistics.median(timed(lambda i=i: exhaustive(i), 1)[0] for i in range(n_queries))
    prec_lin = float(np.mean([(labels[truth[i]] == qlabels[i]).mean() for i in range(n_queries)]))
    out = {"n": n, "copies": copies, "bits": enc.bits, "k": k, "queries": n_queries, "exhaustive_ms": t_lin * 1e3,
           "exhaustive_precision": prec_lin, "distinct_codes": int(len(np.unique(codes, axis=0))), "rows": []}
    print(f"exhaustive cosine (numpy float32 matmul, {n} x {enc.feature_dim}): {t_lin * 1e3:.3f} ms/query, "
          f"class precision@{k} {prec_lin:.4f}")
    print(f"| pool (knob) | ms/query | speed-up | recall@{k} vs exhaustive | class precision@{k} |\n|" + "---|" * 5)
    for pool in pools:
        times, recall, prec = [], [], []
        for i in range(n_queries):
            t0 = time.perf_counter()
            res = index.search(q.codes[i], k=k, features=q.features[i], pool=pool)
            times.append(time.perf_counter() - t0)
            recall.append(len(np.intersect1d(res.ids[0], truth[i])) / k)
            prec.append(float((labels[res.ids[0]] == qlabels[i]).mean()))
        t = statistics.median(times)
        row = {"pool": pool, "ms": t * 1e3, "speedup": t_lin / t, "recall": float(np.mean(recall)),
               "precision": float(np.mean(prec))}
        out["rows"].append(row)
        print(f"| {pool}{' (default)' if pool == pool_size(k) else ''} | {t * 1e3:.3f} | {t_lin / t:.1f}x | "
              f"{row['recall']:.4f} | {row['precision']:.4f} |", flush=True)
    plot_fidelity(out, Path(__file__).parent / "plots" / f"twostep_recall_{n}.png")
    return out


def plot_fidelity(out: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ms = [r["ms"] for r in out["rows"]]
    ax.plot(ms, [r["recall"] for r in out["rows"]], "o-", label="two-step (Hamming shells, cosine re-rank)")
    for j, r in enumerate(out["rows"]):  # labels alternate above and below: neighbouring points sit close
        ax.annotate(f"{r['pool']}", (r["ms"], r["recall"]), textcoords="offset points",
                    xytext=(0, 8 if j % 2 else -14), ha="center", fontsize=7)
    ax.axvline(out["exhaustive_ms"], color="grey", ls="--", label=f"exhaustive cosine ({out['exhaustive_ms']:.2f} ms)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.1, 0.2, 0.5, 1, 2, 5, 10])
    ax.set_ylim(0.9, 1.005)
    ax.set_xlabel("ms per query (one query, median); labels: the pool knob")
    ax.set_ylabel(f"recall@{out['k']} against exhaustive cosine")
    ax.set_title(f"{out['n']:,} real items, {out['bits']}-bit codes, {out['queries']} test queries", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def bench_index(n: int = 1_000_000, bits: int = 48, dim: int = 256) -> dict:
    """Save / open time, first-query latency after open, bytes per item (float16 features, small metadata)."""
    rng = np.random.default_rng(0)
    index = HashIndex(bits=bits, feature_dim=dim, feature_dtype="float16")
    for lo in range(0, n, 250_000):
        m = min(250_000, n - lo)
        index.add(np.arange(lo, lo + m), rng.random((m, bits)) < 0.5,
                  rng.standard_normal((m, dim)).astype(np.float32), metadata=[{"label": i % 10} for i in range(m)])
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    index.save(tmp / "ix")
    save_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in (tmp / "ix").rglob("*") if p.is_file())
    probe = (
        "import time, numpy as np; t0 = time.perf_counter(); from latenthash import HashIndex; "
        f"ix = HashIndex.open({str(tmp / 'ix')!r}, verify=VERIFY); t1 = time.perf_counter(); "
        f"q = np.zeros((1, {bits}), bool); qf = np.ones((1, {dim}), np.float32); "
        "ix.search(q, k=10, features=qf); t2 = time.perf_counter(); ix.search(q, k=10, features=qf); "
        "t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)")
    out = {"n": n, "bits": bits, "feature_dim": dim, "save_s": save_s, "disk_bytes_per_item": disk / n,
           "memory_bytes_per_item": index.stats()["bytes_per_item"]}
    for verify in (False, True):
        vals = subprocess.run([sys.executable, "-c", probe.replace("VERIFY", str(verify))], capture_output=True,
                              text=True, check=True).stdout.split()
        out[f"verify={verify}"] = {"open_s": float(vals[0]), "first_query_s": float(vals[1]),
                                   "second_query_ms": float(vals[2]) * 1e3}
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":  # worker process of bench_hamming
        lib, bits, n, threads = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(measure(lib, bits, n, threads)))
        return
    ap.add_argument("part", choices=["hamming", "twostep", "fidelity", "index"])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--bits", type=int, nargs="+", help="hamming: only the 1M rows of these code lengths")
    ap.add_argument("--run", help="training run directory (twostep)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--pools", type=int, nargs="+", default=[1000, 2000, 3000, 5000, 7000, 10000, 20000, 50000],
                    help="fidelity: values of the pool knob")
    ap.add_argument("--copies", type=int, default=0, choices=range(len(VARIANTS)), metavar="0-15",
                    help="fidelity: grow the database with this many mirrored/shifted copies of each image")
    ap.add_argument("--feature-dtypes", nargs="+", default=["float32", "float16", "int8"],
                    help="twostep: feature storage types to compare")
    args = ap.parse_args()
    print(load_note(), f"| numba threading layer: {numba.config.THREADING_LAYER}", flush=True)
    if args.part == "hamming":
        print(HAMMING_HEADER)
        result = bench_hamming(args.quick, args.bits)
    elif args.part == "twostep":
        if not args.run:
            ap.error("twostep needs --run RUN_DIR (a trained model)")
        result = bench_twostep(args.run, args.n, args.queries, args.feature_dtypes)
    elif args.part == "fidelity":
        if not args.run:
            ap.error("fidelity needs --run RUN_DIR (a trained and exported model)")
        result = bench_fidelity(args.run, args.queries, args.pools, copies=args.copies)
    else:
        result = bench_index(args.n)
    print(load_note("after"))
    tag = "_quick" if args.quick else "_" + "_".join(map(str, args.bits)) if args.bits else ""
    if args.part == "fidelity" and args.copies:
        tag += f"_copies{args.copies}"
    if args.part == "twostep" and args.n != 1_000_000:
        tag += f"_{args.n}"
    if args.part == "hamming":  # its figures differ per CPU kind, and the results page keeps one row per kind
        tag += "_" + cpu_info()["llvm_cpu"]
    if os.environ.get("NUMBA_CPU_NAME"):  # code built for another CPU kind keeps its own file
        tag += "_" + os.environ["NUMBA_CPU_NAME"]
    save(f"search_{args.part}{tag}", result)


if __name__ == "__main__":
    main()
