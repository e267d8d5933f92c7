"""Retrieval quality against code length on full Fashion-MNIST (10k queries, 60k database), with the baselines.

    python benchmarks/bench_quality.py --bits 12 24 32 48 64 [--epochs N] [--runs runs/quality]

For each length: `latenthash train` with its defaults (or --epochs), then the evaluation harness; LSH and PCA-ITQ
on raw pixels at the same length, and the float-feature linear search of the 48-bit model. A run directory that
already holds a finished evaluation is reused. Prints a markdown table and writes results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[12, 24, 32, 48, 64])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--runs", default="runs/quality")
    args = ap.parse_args()
    rows = {}
    for bits in args.bits:
        run = Path(args.runs) / f"fm{bits}"
        report_path = run / "report.json"
        if not report_path.exists():
            cmd = [sys.executable, "-m", "latenthash.cli", "train", "--dataset", "fashion-mnist", "--bits", str(bits),
                   "--out", str(run)]
            if args.epochs:
                cmd += ["--epochs", str(args.epochs)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            train_s = time.perf_counter() - t0
            subprocess.run([sys.executable, "-m", "latenthash.cli", "eval", str(run), "--json", str(report_path)],
                           check=True)
            report = json.loads(report_path.read_text())
            report["train_wall_seconds"] = train_s
            report_path.write_text(json.dumps(report, indent=1))
        rows[bits] = json.loads(report_path.read_text())
    print("| bits | ours mAP@all | ours mAP@1000 | ours P(r<=2) | accuracy | LSH mAP@all | PCA-ITQ mAP@all | "
          "PCA-ITQ P(r<=2) | train s |\n|---|---|---|---|---|---|---|---|---|")
    for bits, r in rows.items():
        lsh, itq = r["baselines"]["lsh"][str(bits)], r["baselines"]["pca_itq"][str(bits)]
        print(f"| {bits} | {r['map_all']:.4f} | {r['map_at_1000']:.4f} | {r['precision_r2']:.4f} | "
              f"{r['accuracy']:.4f} | {lsh['map_all']:.4f} | {itq['map_all']:.4f} | {itq['precision_r2']:.4f} | "
              f"{sum(h['seconds'] for h in r['history']):.0f} |")
    for bits, r in rows.items():
        print(f"linear search (exhaustive cosine on the {bits}-bit model's float features): "
              f"mAP@all {r['linear_search']['map_all']:.4f}, mAP@1000 {r['linear_search']['map_at_1000']:.4f}")
    save("quality", {b: {k: r[k] for k in ("map_all", "map_at_1000", "precision_r2", "accuracy", "baselines",
                                           "linear_search", "history")} for b, r in rows.items()})


if __name__ == "__main__":
    main()
