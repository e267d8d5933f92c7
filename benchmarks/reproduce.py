"""The seed paper's experiments redone: classification error, precision against the number of retrieved images,
precision and mAP against code length, and CPU time of hash search against linear search.

    python benchmarks/bench_quality.py --bits 12 24 32 48 64        # first: trains and evaluates each length
    python benchmarks/reproduce.py [--runs runs/quality] [--search-run runs/quality/fm48] [--queries 1000]

Reads the evaluation reports of `runs/quality/fm{bits}` (any dataset: MNIST or CIFAR-10 runs are evaluated the same
way when their files are given to `latenthash train --dataset mnist --data-dir ...`), times hash search against
linear search on the 48-bit run's real database, prints markdown tables, and writes the plots to
benchmarks/plots/ and the figures to benchmarks/results/reproduction.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import save

HERE = Path(__file__).parent
PLOTS, RESULTS = HERE / "plots", HERE / "results"


def load_reports(runs: Path) -> dict[int, dict]:
    reports = {}
    for path in sorted(runs.glob("*/report.json")):
        r = json.loads(path.read_text())
        reports[int(r["bits"])] = r
    if not reports:
        raise SystemExit(f"no run reports under {runs}: run benchmarks/bench_quality.py first")
    return dict(sorted(reports.items()))


def quality_tables(reports: dict[int, dict]) -> dict:
    print("| bits | classification error | mAP@all | mAP@1000 | P(r<=2) | P@1 | P@10 | P@100 | P@1000 | "
          "LSH mAP@all | PCA-ITQ mAP@all |\n|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for bits, r in reports.items():
        p = r["precision_at_k"]
        lsh, itq = r["baselines"]["lsh"][str(bits)], r["baselines"]["pca_itq"][str(bits)]
        out[bits] = {"error": 1 - r["accuracy"], "map_all": r["map_all"], "map_at_1000": r["map_at_1000"],
                     "precision_r2": r["precision_r2"], "precision_at_k": p, "lsh": lsh, "pca_itq": itq,
                     "linear_search": r["linear_search"]}
        print(f"| {bits} | {100 * (1 - r['accuracy']):.2f}% | {r['map_all']:.4f} | {r['map_at_1000']:.4f} | "
              f"{r['precision_r2']:.4f} | {p['1']:.4f} | {p['10']:.4f} | {p['100']:.4f} | {p['1000']:.4f} | "
              f"{lsh['map_all']:.4f} | {itq['map_all']:.4f} |")
    return out


def plot_quality(reports: dict[int, dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    bits = list(reports)
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, r in reports.items():
        ks = [int(k) for k in r["precision_at_k"]]
        ax.plot(ks, list(r["precision_at_k"].values()), marker="o", label=f"{b} bits")
    ax.set(xscale="log", xlabel="number of retrieved images", ylabel="precision",
           title="Precision against retrieved images (Fashion-MNIST)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "precision_at_k.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = {"latent hash layer": [reports[b]["map_all"] for b in bits],
              "PCA-ITQ": [reports[b]["baselines"]["pca_itq"][str(b)]["map_all"] for b in bits],
              "LSH": [reports[b]["baselines"]["lsh"][str(b)]["map_all"] for b in bits]}
    for name, ys in series.items():
        axes[0].plot(bits, ys, marker="o", label=name)
    axes[0].set(xlabel="code length (bits)", ylabel="mAP@all", title="mAP against code length")
    series = {"latent hash layer": [reports[b]["precision_r2"] for b in bits],
              "PCA-ITQ": [reports[b]["baselines"]["pca_itq"][str(b)]["precision_r2"] for b in bits],
              "LSH": [reports[b]["baselines"]["lsh"][str(b)]["precision_r2"] for b in bits]}
    for name, ys in series.items():
        axes[1].plot(bits, ys, marker="o", label=name)
    axes[1].set(xlabel="code length (bits)", ylabel="precision within Hamming radius 2",
                title="Precision (r <= 2) against code length")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(bits)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "quality_vs_bits.png", dpi=120)
    plt.close(fig)
    return ["precision_at_k.png", "quality_vs_bits.png"]


def search_times(run: Path, queries: int, k: int = 100, pool: int = 1000) -> dict:
    """Per-query CPU time on the run's real database: linear search (exhaustive cosine over float32 features, numpy
    matrix product + argpartition, as the paper's baseline) against hash search (exact Hamming top-k; two-step)."""
    from latenthash import HashIndex
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_fashion_mnist

    ds = load_fashion_mnist()
    enc = Encoder.open(run / "model.onnx")
    db, q = enc.encode(ds.train.images), enc.encode(ds.test.images[:queries])
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype="float32")
    index.add(np.arange(len(db.codes)), db.codes, db.features)
    index.warmup()
    feats = np.ascontiguousarray(db.features, dtype=np.float32)

    def linear(i):
        scores = feats @ q.features[i]
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top], kind="stable")]

    calls = {"linear search (exhaustive cosine, float32)": linear,
             "hash search: exact Hamming top-100": lambda i: index.search(q.codes[i], k),
             "hash search: two-step (pool 1000 -> cosine top-100)":
                 lambda i: index.search(q.codes[i], k, features=q.features[i], pool=pool)}
    med = {}
    for name, fn in calls.items():
        fn(0)
        times = []
        for i in range(queries):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        med[name] = statistics.median(times) * 1e3
    base = med["linear search (exhaustive cosine, float32)"]
    print(f"\n{len(db.codes):,}-image database ({enc.bits}-bit codes, {enc.feature_dim}-d features), "
          f"{queries} single queries, median ms/query\n")
    print("| method | ms/query | speed-up vs linear search |\n|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.3f} | {base / ms:.1f}x |")
    return {"database": len(db.codes), "bits": enc.bits, "queries": queries, "ms": med}


def plot_times(times: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times["ms"])
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.barh([n.replace(": ", ":\n") for n in names], [times["ms"][n] for n in names], color=["grey", "C0", "C1"])
    ax.set(xscale="log", xlabel="ms per query (log scale)", xlim=(0.05, 4 * max(times["ms"].values())),
           title=f"CPU time per query, {times['database']:,} images, 2 cores")
    for y, n in enumerate(names):
        ax.text(times["ms"][n], y, f" {times['ms'][n]:.3f} ms", va="center")
    fig.tight_layout()
    fig.savefig(PLOTS / "search_time.png", dpi=120)
    plt.close(fig)
    return "search_time.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/quality"))
    ap.add_argument("--search-run", type=Path, default=Path("runs/quality/fm48"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--replot", action="store_true", help="redraw the plots from results/reproduction.json")
    args = ap.parse_args()
    reports = load_reports(args.runs)
    if args.replot:
        plot_quality(reports)
        saved = json.loads((RESULTS / "reproduction.json").read_text())
        plot_times(saved.get("result", saved)["search"])  # files from before the stamp hold the figures at the top
        return
    quality = quality_tables(reports)
    plots = plot_quality(reports)
    times = search_times(args.search_run, args.queries)
    plots.append(plot_times(times))
    save("reproduction", {"quality": quality, "search": times, "plots": plots})
    print("\nplots:", ", ".join(f"benchmarks/plots/{p}" for p in plots))


if __name__ == "__main__":
    main()
