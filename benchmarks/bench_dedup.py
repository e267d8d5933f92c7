"""Near-duplicate groups (`latenthash dedup`): precision and recall of planted copy pairs, and the time: copy
groups by the model's copy descriptors (the default where the model has a copy head) at the default margins and
around them, then the code-and-feature rule over radius and min-score; then the time at ~1M items.

    python benchmarks/bench_dedup.py --run runs/quickstart [--copies 1000] [--unseen] [--million]

The database: the 60,000 Fashion-MNIST training images plus one altered copy of each of `--copies` of them (JPEG
quality 70, resized by 0.9-1.1, shifted by up to 2 px, brightness +-10%), encoded by the run's model.onnx. A found
pair is any two items in one group (groups are transitive). The index is built as `latenthash index` builds it
(`Searcher.upsert` of the images: codes, features and copy descriptors). `--unseen` plants copies of 1,000 test
images instead, with those originals added to the database: images the copy head never trained on. Two precisions:
over the found pairs that involve a planted copy ("copy pairs": is a copy grouped with its own original only?), and
over all found pairs (strict: the 60k originals hold near-duplicates of their own, which count against it here).
`--million` also times dedup on the ~1M database of bench_search.py fidelity --copies 15 (each image with 15
mirrored/shifted copies). `--pixel-ceiling` measures how separable the copies are from the other images by their
pixels at all; `--learned EPOCHS` how far a descriptor trained for copy detection goes (copy_ceiling.py).
"""

from __future__ import annotations

import argparse
import io
import itertools
import time
from pathlib import Path

import numpy as np
from bench_search import VARIANTS, copies_database, variant
from common import load_note, save
from PIL import Image

from latenthash import Encoder, HashIndex, Searcher
from latenthash.export.data import load_fashion_mnist
from latenthash.limits import COPY_FLOOR, COPY_MARGINS, DEDUP_MIN_SCORE, DEDUP_RADIUS

COPY_GRID = ((COPY_MARGINS, COPY_FLOOR), (COPY_MARGINS, 0.85), (COPY_MARGINS, 0.9), (COPY_MARGINS, 0.92),
             ((0.002,), COPY_FLOOR), ((0.002, 0.02, 0.03), COPY_FLOOR), (COPY_MARGINS, -1.0), ((0.002,), -1.0))


def altered(image: np.ndarray, rng: np.random.Generator, geometric: bool = True) -> bytes:
    """One altered copy of a grey uint8 (H, W, 1) image, as the JPEG file a user's collection would hold; without
    `geometric`, brightness and JPEG only (no shift, no resize)."""
    h, w = image.shape[:2]
    dy, dx = (int(v) for v in rng.integers(-2, 3, 2)) if geometric else (0, 0)
    out = variant(image[None], False, dx, dy)[0, ..., 0].astype(np.float32) * rng.uniform(0.9, 1.1)
    scale = rng.uniform(0.9, 1.1) if geometric else 1.0
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def _centred(a: np.ndarray) -> np.ndarray:
    """Images (..., H, W) minus their mean, over their norm: dot products are Pearson correlations."""
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    return a / (np.linalg.norm(a.reshape(*a.shape[:-2], -1), axis=-1)[..., None, None] + 1e-6)


def _spectra(a: np.ndarray, m: int = 8) -> np.ndarray:
    """Shift-tolerant descriptors: square roots of the low-frequency 2-D Fourier magnitudes (DC dropped), unit norm."""
    f = np.abs(np.fft.rfft2(a, axes=(1, 2)))
    f = np.sqrt(np.concatenate([f[:, :m, :m], f[:, -m:, :m]], axis=1).reshape(len(a), -1))
    f[:, 0] = 0
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def pixel_ceiling(originals: np.ndarray, copies: np.ndarray, picked: np.ndarray, shortlist: int = 300) -> dict:
    """How separable the planted copies are from the other images by their pixels, whatever the descriptor: for
    each copy, the Pearson correlation with its own original and with the best other training image, each at the
    best of the 25 shifts by -2..2 px (the alteration's own range), over a shortlist of the images nearest by
    Fourier magnitude (own original always included). A copy whose best other beats its original defeats any
    detector that scores by pixel likeness; the share of such copies is a lower bound (others outside the
    shortlist are not scored)."""
    X, C = originals[..., 0].astype(np.float32), copies[..., 0].astype(np.float32)
    near = np.argsort(-(_spectra(C) @ _spectra(X).T), axis=1)[:, :shortlist]
    xn = _centred(X)
    own, other = np.empty(len(C)), np.empty(len(C))
    for j, img in enumerate(C):
        moved = np.stack([variant(img[None, ..., None], False, dx, dy)[0, ..., 0]
                          for dy in range(-2, 3) for dx in range(-2, 3)])
        cand = np.union1d(near[j], picked[j])
        best = np.einsum("shw,chw->cs", _centred(moved), xn[cand]).max(1)
        own[j], other[j] = best[cand == picked[j]][0], best[cand != picked[j]].max()
    return {"shortlist": shortlist, "beaten_share": float((other >= own).mean()),
            "own_correlation_quantiles": np.quantile(own, [0.05, 0.1, 0.5]).round(4).tolist(),
            "best_other_quantiles": np.quantile(other, [0.5, 0.9]).round(4).tolist()}


def pair_counts(groups, n: int, picked: np.ndarray) -> tuple[int, int, int]:
    """(pairs found, pairs found that involve a planted copy, planted pairs found) without listing the pairs: a found
    pair is two items of one group; copies are items n.. (copy j of item picked[j])."""
    label = np.full(n + len(picked), -1, np.int64)
    found = with_copy = 0
    for g, group in enumerate(groups):
        label[group.ids] = g
        size, copies = len(group), int((group.ids >= n).sum())
        found += size * (size - 1) // 2
        with_copy += size * (size - 1) // 2 - (size - copies) * (size - copies - 1) // 2
    copy_label = label[n:]
    hit = int(((copy_label >= 0) & (copy_label == label[picked])).sum())
    return found, with_copy, hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart", help="a run directory holding model.onnx")
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--radii", type=int, nargs="*", default=[2])
    ap.add_argument("--scores", type=float, nargs="*", default=[0.99, 0.998])
    ap.add_argument("--unseen", action="store_true", help="plant copies of test images (added as originals too)")
    ap.add_argument("--million", action="store_true", help="also time dedup on the ~1M copies database")
    ap.add_argument("--photometric", action="store_true", help="copies altered by brightness and JPEG only")
    ap.add_argument("--pixel-ceiling", action="store_true",
                    help="also measure how often another image is likelier than a copy's own original by pixels")
    ap.add_argument("--learned", type=int, metavar="EPOCHS", default=0,
                    help="also train a copy descriptor (on the test images) for this many epochs and score the copies")
    ap.add_argument("--learned-views", type=int, default=8, help="altered versions of each test image it trains on")
    args = ap.parse_args()
    print(load_note(), flush=True)
    enc = Encoder.open(Path(args.run) / "model.onnx")
    data = load_fashion_mnist()
    train = data.train
    rng = np.random.default_rng(0)
    database = np.concatenate([train.images, data.test.images[:args.copies]]) if args.unseen else train.images
    n = len(database)
    picked = (np.arange(len(train.images), n) if args.unseen
              else np.sort(rng.choice(len(train.images), args.copies, replace=False)))
    copies = [altered(database[i], rng, geometric=not args.photometric) for i in picked]
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
    searcher = Searcher(index, enc)
    t0 = time.perf_counter()
    searcher.upsert(np.arange(n), images=database)
    searcher.upsert(np.arange(n, n + len(copies)), images=copies)
    print(f"indexed {n + len(copies):,} images in {time.perf_counter() - t0:.1f} s", flush=True)
    index.warmup()
    if index.copies is not None:
        index.copies.warmup()
    index.duplicates(radius=0, min_score=0.99)  # compile the kernels outside the timings
    result: dict = {"database": n + len(copies), "copies": args.copies, "bits": enc.bits, "unseen": args.unseen,
                    "alterations": "brightness, JPEG 70" if args.photometric else "shift, resize, brightness, JPEG 70"}
    if index.copies is not None:
        result["copy_groups"] = copy_rows = []
        print("| margins (groups of 2, 3, 4) | floor | groups | items | found pairs | copy-pair precision | "
              "strict precision | recall | seconds |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        for margins, floor in COPY_GRID:
            t0 = time.perf_counter()
            groups = index.duplicates(margins=margins, floor=floor)
            seconds = time.perf_counter() - t0
            found, with_copy, hit = pair_counts(groups, n, picked)
            row = {"margins": list(margins), "floor": floor, "groups": len(groups), "items": int(sum(map(len, groups))),
                   "found_pairs": found, "copy_pair_precision": hit / max(1, with_copy),
                   "strict_precision": hit / max(1, found), "recall": hit / len(picked), "seconds": seconds,
                   "default": (margins, floor) == (COPY_MARGINS, COPY_FLOOR)}
            copy_rows.append(row)
            print(f"| {', '.join(map(str, margins))} | {floor} | {row['groups']:,} | {row['items']:,} | {found:,} | "
                  f"{row['copy_pair_precision']:.3f} | {row['strict_precision']:.3f} | {row['recall']:.3f} | "
                  f"{seconds:.2f} |{' (default)' if row['default'] else ''}", flush=True)
    rows = []
    print("| radius | min score | groups | items | found pairs | copy-pair precision | strict precision | recall | "
          "seconds |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for radius, score in itertools.product(args.radii, args.scores):
        t0 = time.perf_counter()
        groups = index.duplicates(radius=radius, min_score=score)
        seconds = time.perf_counter() - t0
        found, with_copy, hit = pair_counts(groups, n, picked)
        row = {"radius": radius, "min_score": score, "groups": len(groups), "items": int(sum(map(len, groups))),
               "found_pairs": found, "copy_pair_precision": hit / max(1, with_copy),
               "strict_precision": hit / max(1, found), "recall": hit / len(picked), "seconds": seconds,
               "default": index.copies is None and (radius, score) == (DEDUP_RADIUS, DEDUP_MIN_SCORE)}
        rows.append(row)
        print(f"| {radius} | {score} | {row['groups']:,} | {row['items']:,} | {row['found_pairs']:,} | "
              f"{row['copy_pair_precision']:.3f} | {row['strict_precision']:.3f} | {row['recall']:.3f} | "
              f"{seconds:.2f} |{' (default)' if row['default'] else ''}", flush=True)
    result["grid"] = rows
    copy_pixels = enc.to_array(copies)  # the copies as the model sees them (decoded, resized)
    if args.pixel_ceiling:
        result["pixel_ceiling"] = ceiling = pixel_ceiling(train.images, copy_pixels, picked)
        print(f"pixel ceiling: for {ceiling['beaten_share']:.1%} of the copies another training image correlates "
              f"better (best of 25 shifts) than the copy's own original; own correlation 5/10/50%: "
              f"{ceiling['own_correlation_quantiles']}, best other 50/90%: {ceiling['best_other_quantiles']}",
              flush=True)
    if args.learned:
        from copy_ceiling import copy_scores, train_descriptor

        test = load_fashion_mnist().test.images
        vrng = np.random.default_rng(1)
        views = np.stack([test] + [enc.to_array([altered(im, vrng) for im in test])
                                   for _ in range(args.learned_views)])[..., 0]
        t0 = time.perf_counter()
        describe = train_descriptor(views, epochs=args.learned)
        seconds = time.perf_counter() - t0
        learned = copy_scores(describe, train.images[..., 0], copy_pixels[..., 0], picked)
        result["learned"] = {**learned, "epochs": args.learned, "views": args.learned_views, "train_seconds": seconds}
        print(f"learned copy descriptor ({args.learned} epochs on {len(test):,} test images x {args.learned_views} "
              f"altered views, {result['learned']['train_seconds']:.0f} s): another training image scores higher "
              f"than the copy's own original for {learned['beaten_share']:.1%} of the copies; own 5/10/50%: "
              f"{learned['own_quantiles']}, best other 50/90%: {learned['best_other_quantiles']}", flush=True)
        for point in learned["curve"]:
            print(f"  threshold {point['threshold']}: recall {point['recall']:.3f}, copy-pair precision "
                  f"{point['copy_pair_precision']:.3f}", flush=True)
    if args.million:
        codes, feats, _ = copies_database(args.run, enc, train.images, train.labels, 15)
        described = (np.concatenate([enc.describe_copies(variant(train.images, mirror, dx, dy))
                                     for mirror, dx, dy in VARIANTS[:16]]) if enc.info.copy_dim else None)
        big = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim)
        big.add(np.arange(len(codes)), codes, feats, copies=described)
        big.warmup()
        t0 = time.perf_counter()
        groups = big.duplicates()
        seconds = time.perf_counter() - t0
        result["million"] = {"items": len(codes), "seconds": seconds, "groups": len(groups),
                             "grouped_items": int(sum(map(len, groups))), "largest": len(groups[0]) if groups else 0}
        print(f"dedup at the defaults ({'copy groups' if big.copies is not None else 'codes and features'}) over "
              f"{len(codes):,} items: {seconds:.1f} s, {len(groups):,} groups, "
              f"{result['million']['grouped_items']:,} items grouped, largest {result['million']['largest']}")
    print(load_note("after"))
    name = "dedup_photometric" if args.photometric else "dedup_unseen" if args.unseen else "dedup"
    name += "_million" if args.million else ""
    print("saved", save(name, result))


if __name__ == "__main__":
    main()
