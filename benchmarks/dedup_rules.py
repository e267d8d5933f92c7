"""Which rule links near-duplicates, on features that do tell copies apart: a fixed cosine threshold against rules
relative to each item's own neighbourhood, with copies planted singly and in threes.

    python benchmarks/dedup_rules.py --run RUN_DIR [--singles 1000] [--triples 300]

The database: the 60,000 Fashion-MNIST training images, one altered copy (bench_dedup.py's alterations) of each of
`--singles` of them and two copies of each of `--triples` others, encoded by the run's model.onnx. Every item's exact
top 8 by cosine (float32; `--candidates search`: by the index's own two-step search over the model's codes, as
a product would find them), then links by rule, grouped transitively:

- threshold t: every pair at cosine >= t (what `dedup --min-score` does within its code radius);
- group margins (m2, m3, m4): groups of 2, 3, 4 items that agree on themselves (each member's nearest are exactly
  the others) and whose weakest cosine inside beats the best to an outsider by m2, m3, m4 (for a pair: each other's
  nearest, beating each one's second nearest by m2: a mutual-nearest-neighbour ratio test).

Copy-pair precision: of the found pairs that involve a copy, the share inside the copy's true group; recall: copies
grouped with their source, singles and triples apart. `--learned` scores by a descriptor trained for copies
(copy_ceiling.py) instead of the run's features. Fashion-MNIST's originals hold near-twins of their own, which
count against precision here. A measurement for choosing a rule, not the product's rule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_dedup import altered
from common import load_note, save

from latenthash import Encoder, HashIndex
from latenthash import kernels as K
from latenthash.copies import group_links
from latenthash.export.data import load_fashion_mnist

NEIGHBOURS = 8  # kept per item


def exact_neighbours(features: np.ndarray, k: int = NEIGHBOURS, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows) of every row's k nearest other rows, best first."""
    n = len(features)
    sims, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for lo in range(0, n, block):
        s = features[lo:lo + block] @ features.T
        s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf
        top = np.argpartition(-s, k, axis=1)[:, :k]
        ts = np.take_along_axis(s, top, 1)
        order = np.argsort(-ts, axis=1, kind="stable")
        rows[lo:lo + block], sims[lo:lo + block] = np.take_along_axis(top, order, 1), np.take_along_axis(ts, order, 1)
    return sims, rows


def searched_neighbours(codes: np.ndarray, features: np.ndarray,
                        k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray, float]:
    """(cosines, rows) of every row's k nearest other rows by the index's own two-step search (default pool,
    float16 features as stored), and the seconds the searches took (buckets built first)."""
    n = len(codes)
    index = HashIndex(bits=codes.shape[1] * 8, feature_dim=features.shape[1])
    index.add(np.arange(n), codes, features)
    index.warmup()
    t0 = time.perf_counter()
    found = index.search(codes, k=k + 1, features=features)
    seconds = time.perf_counter() - t0
    if (found.counts < k + 1).any():
        raise SystemExit("the database is too small for its neighbours")
    others = np.argsort(found.ids == np.arange(n)[:, None], axis=1, kind="stable")[:, :k]  # the item itself last
    return np.take_along_axis(found.scores, others, 1), np.take_along_axis(found.ids, others, 1), seconds


def score(a: np.ndarray, b: np.ndarray, truth: np.ndarray, n: int, sources: np.ndarray, singles: int) -> dict:
    """Group the links (a, b) transitively; copy-pair precision and recall against the true groups (`truth`: the
    source image of every planted item, -1 for the rest; copies are rows n..)."""
    total = len(truth)
    label = K.components(total, a.astype(np.int64), b.astype(np.int64))  # transitive groups, as dedup makes them
    size = np.bincount(label, minlength=total)
    copies = np.bincount(label[n:], minlength=total)
    pairs = lambda m: m * (m - 1) // 2  # noqa: E731
    with_copy = int((pairs(size) - pairs(size - copies)).sum())
    key = label.astype(np.int64) * (n + 1) + np.where(truth >= 0, truth, n)  # (group, true group) of planted items
    planted = truth >= 0
    uniq, counts = np.unique(key[planted], return_counts=True)
    copy_counts = np.unique(key[n:], return_counts=True)
    copies_in = dict(zip(copy_counts[0].tolist(), copy_counts[1].tolist()))
    right = sum(pairs(c) - pairs(c - copies_in.get(k_, 0)) for k_, c in zip(uniq.tolist(), counts.tolist()))
    found = label[n:] == label[sources]
    return {"copy_pair_precision": right / max(1, with_copy), "recall_singles": float(found[:singles].mean()),
            "recall_triples": float(found[singles:].mean()) if len(found) > singles else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory holding model.onnx")
    ap.add_argument("--singles", type=int, default=1000)
    ap.add_argument("--triples", type=int, default=300)
    ap.add_argument("--candidates", choices=("exact", "search"), default="exact",
                    help="each item's neighbours: exact, or by the two-step search over the model's codes")
    ap.add_argument("--learned", type=int, metavar="EPOCHS", default=0,
                    help="score by copy_ceiling.py's descriptor trained this many epochs on the test images (8 altered "
                         "views each) instead of the run's features")
    args = ap.parse_args()
    print(load_note(), flush=True)
    encoder = Encoder.open(Path(args.run) / "model.onnx")
    train = load_fashion_mnist().train
    n = len(train.images)
    rng = np.random.default_rng(0)
    chosen = rng.choice(n, args.singles + args.triples, replace=False)
    sources = np.concatenate([chosen, chosen[args.singles:]])
    copies = [altered(train.images[i], rng) for i in sources]
    encoded = [encoder.encode(train.images), encoder.encode(copies)]
    if args.learned:
        from copy_ceiling import train_descriptor

        test, vrng = load_fashion_mnist().test.images, np.random.default_rng(1)
        views = np.stack([test] + [encoder.to_array([altered(im, vrng) for im in test]) for _ in range(8)])
        describe = train_descriptor(views[..., 0], epochs=args.learned)
        features = describe(np.concatenate([train.images, encoder.to_array(copies)])[..., 0])
    else:
        features = np.concatenate([e.features for e in encoded])
    truth = np.full(len(features), -1, np.int64)
    truth[sources], truth[n:] = sources, sources
    if args.candidates == "search":
        sims, rows, seconds = searched_neighbours(np.concatenate([e.codes for e in encoded]), features)
        print(f"two-step top {NEIGHBOURS} of all {len(features):,} items: {seconds:.1f} s", flush=True)
    else:
        sims, rows = exact_neighbours(features.astype(np.float32))
    a, b, s = np.repeat(np.arange(len(features)), NEIGHBOURS), rows.reshape(-1), sims.reshape(-1)

    own = s[(a >= n) & (b == sources[np.clip(a - n, 0, len(sources) - 1)])]
    rules: list[tuple[str, np.ndarray, np.ndarray]] = [(f"threshold {t:.4f}", a[s >= t], b[s >= t])
                                                       for t in np.quantile(own, [0.05, 0.1, 0.2]).round(4)]
    for margins in ((0.002,), (0.005,), (0.01,), (0.03,), (0.002, 0.02, 0.03), (0.002, 0.01, 0.02),
                    (0.01, 0.05, 0.08)):
        links = [group_links(sims, rows, size, m) for size, m in enumerate(margins, start=2)]
        rules.append((f"group margins {', '.join(map(str, margins))}", np.concatenate([x for x, _ in links]),
                      np.concatenate([y for _, y in links])))
    print("| rule | copy-pair precision | recall (single copies) | recall (copies in threes) |\n|---|---|---|---|")
    rows_out = []
    for name, x, y in rules:
        r = {"rule": name, **score(x, y, truth, n, sources, args.singles)}
        rows_out.append(r)
        triples = "-" if r["recall_triples"] is None else f"{r['recall_triples']:.3f}"
        print(f"| {name} | {r['copy_pair_precision']:.3f} | {r['recall_singles']:.3f} | {triples} |", flush=True)
    result = {"run": args.run, "learned_epochs": args.learned, "candidates": args.candidates,
              "singles": args.singles, "triples": args.triples, "neighbours": NEIGHBOURS, "rules": rows_out}
    name = f"dedup_rules_learned{args.learned}" if args.learned else f"dedup_rules_{Path(args.run).name}"
    name += "_search" if args.candidates == "search" else ""
    print("saved", save(name, result))


if __name__ == "__main__":
    main()
