"""Encoder speed: PyTorch eager against ONNX Runtime (CPU) on the same model and the same real images, in one run.

    python benchmarks/bench_encode.py --run RUN_DIR [--model model.onnx] [--threads 2]
    python benchmarks/bench_encode.py --install-size      # size of the base (torch-free) install in a fresh venv

Batches 1, 8 and 64; medians of interleaved repetitions; images/s and per-batch latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def bench_speed(run_dir: str, model: str | None, threads: int, reps: int) -> list[dict]:
    import torch

    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.model import ExportWrapper
    from latenthash.export.onnx import export_onnx
    from latenthash.export.train import load_model

    torch.set_num_threads(threads)
    net, ckpt = load_model(run_dir)
    wrapper = ExportWrapper(net).eval()
    if model is None:
        model = str(Path(tempfile.mkdtemp()) / "model.onnx")
        export_onnx(run_dir, model)
    enc = Encoder.open(model, runtime="onnxruntime", threads=threads)
    images = load_dataset(ckpt["dataset"]).test.images
    rows = []
    for batch in (1, 8, 64):
        x = images[:batch]
        xt = torch.from_numpy(np.ascontiguousarray(x))

        def eager():
            with torch.inference_mode():
                wrapper(xt)

        def ort():
            enc.runtime.run(x)

        times = {"pytorch": [], "onnxruntime": []}
        for fn in (eager, ort):
            for _ in range(5):
                fn()
        for _ in range(reps):
            for name, fn in (("pytorch", eager), ("onnxruntime", ort)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": batch, "threads": threads,
               **{f"{k}_ms": v * 1e3 for k, v in med.items()},
               **{f"{k}_img_s": batch / v for k, v in med.items()},
               "ort_speedup": med["pytorch"] / med["onnxruntime"]}
        rows.append(row)
        print(f"| {batch} | {row['pytorch_ms']:.3f} | {row['pytorch_img_s']:,.0f} | {row['onnxruntime_ms']:.3f} | "
              f"{row['onnxruntime_img_s']:,.0f} | {row['ort_speedup']:.2f}x |", flush=True)
    return rows


def install_size() -> dict:
    """pip install the base package (no extras) into a fresh venv and measure site-packages."""
    venv = Path(tempfile.mkdtemp()) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(ROOT)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    sizes = {}
    for p in site.iterdir():
        total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        sizes[p.name] = total
    total = sum(sizes.values())
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
    has_torch = any(name.startswith("torch") for name in sizes)
    out = {"total_mb": total / 1e6, "largest_mb": {k: round(v / 1e6, 1) for k, v in top}, "torch_installed": has_torch}
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run")
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--install-size", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if args.install_size:
        result = install_size()
        (OUT / "encode_install_size.json").write_text(json.dumps(result, indent=1))
        return
    if not args.run:
        ap.error("--run RUN_DIR is needed for the speed comparison")
    print("| batch | PyTorch eager ms | img/s | ONNX Runtime ms | img/s | ORT vs eager |\n|---|---|---|---|---|---|")
    rows = bench_speed(args.run, args.model, args.threads, args.reps)
    (OUT / "encode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
