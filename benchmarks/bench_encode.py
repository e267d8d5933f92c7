"""Encoder speed: PyTorch eager against ONNX Runtime (CPU) on the same model and the same real images, in one run.

    python benchmarks/bench_encode.py --run RUN_DIR [--model model.onnx] [--threads 2]
    python benchmarks/bench_encode.py --run RUN_DIR --precisions   # FP32 / FP16 / INT8 files side by side
    python benchmarks/bench_encode.py --install-size      # size of the base (torch-free) install in a fresh venv

Batches 1, 8 and 64; medians of interleaved repetitions; images/s and per-batch latency. --precisions exports the
run at each precision (the export's own checks: code-bit agreement with FP32 on the 10k test images, mAP@all of
each file's codes) and times each file at batches 1 and 64 on every ONNX Runtime provider present (CPU here; CUDA
and TensorRT where installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import interleaved, save

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

        def eager(xt=xt):
            with torch.inference_mode():
                wrapper(xt)

        def ort(x=x):
            enc.runtime.run(x)

        med = interleaved({"pytorch": eager, "onnxruntime": ort}, reps, warmup=5)
        row = {"batch": batch, "threads": threads,
               **{f"{k}_ms": v * 1e3 for k, v in med.items()},
               **{f"{k}_img_s": batch / v for k, v in med.items()},
               "ort_speedup": med["pytorch"] / med["onnxruntime"]}
        rows.append(row)
        print(f"| {batch} | {row['pytorch_ms']:.3f} | {row['pytorch_img_s']:,.0f} | {row['onnxruntime_ms']:.3f} | "
              f"{row['onnxruntime_img_s']:,.0f} | {row['ort_speedup']:.2f}x |", flush=True)
    return rows


def bench_precisions(run_dir: str, threads: int, reps: int) -> dict:
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.export.onnx import export_onnx
    from latenthash.export.train import load_model
    from latenthash.runtimes.onnxruntime import default_providers

    _, ckpt = load_model(run_dir)
    out = Path(tempfile.mkdtemp()) / "model.onnx"
    report = export_onnx(run_dir, out, precisions=("fp16", "int8"))["precisions"]
    images = load_dataset(ckpt["dataset"]).test.images
    providers = [p if isinstance(p, str) else p[0] for p in default_providers()]
    rows = []
    for provider in providers:
        encoders = {name: Encoder.open(r["path"], runtime="onnxruntime", threads=threads, providers=[provider])
                    for name, r in report.items() if r.get("kept", True)}
        for batch in (1, 64):
            x = images[:batch]
            med = interleaved({name: (lambda e=enc, x=x: e.runtime.run(x)) for name, enc in encoders.items()}, reps,
                              warmup=5)
            for name, sec in med.items():
                ms = sec * 1e3
                r = report[name]
                row = {"provider": provider, "precision": name, "batch": batch, "ms": ms, "img_s": batch / ms * 1e3,
                       "vs_fp32": med["fp32"] * 1e3 / ms, "mb": r["bytes"] / 1e6,
                       "size_vs_fp32": r["bytes"] / report["fp32"]["bytes"],
                       "bit_agreement": r.get("bit_agreement", 1.0),
                       "map_all": r["map_all"], "precision_r2": r["precision_r2"]}
                rows.append(row)
                print(f"| {provider} | {name} | {batch} | {ms:.3f} | {row['img_s']:,.0f} | {row['vs_fp32']:.2f}x | "
                      f"{row['mb']:.2f} ({row['size_vs_fp32']:.0%}) | {row['bit_agreement']:.4f} | "
                      f"{row['map_all']:.4f} | {row['precision_r2']:.4f} |", flush=True)
    return {"export": report, "rows": rows}


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
    ap.add_argument("--precisions", action="store_true", help="FP32, FP16 and INT8 files side by side")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if args.install_size:
        result = install_size()
        save("encode_install_size", result)
        return
    if not args.run:
        ap.error("--run RUN_DIR is needed for the speed comparison")
    if args.precisions:
        print("| provider | precision | batch | ms | img/s | vs FP32 | file MB | code-bit agreement | mAP@all | "
              "P(r<=2) |\n|" + "---|" * 10)
        result = bench_precisions(args.run, args.threads, args.reps)
        save("encode_precisions", result)
        return
    print("| batch | PyTorch eager ms | img/s | ONNX Runtime ms | img/s | ORT vs eager |\n|---|---|---|---|---|---|")
    rows = bench_speed(args.run, args.model, args.threads, args.reps)
    save("encode", rows)


if __name__ == "__main__":
    main()
